"""A stand-alone Kubernetes API server for the tests: kmock's KubernetesEmulator over HTTP.

No kube-apiserver can run on the test machines (see docs/kubernetes.md), so this process
IS the API server the real operator and the official `kubernetes` client talk to.
kmock (pinned: kmock==0.8; this file reaches into kmock._internal) stores objects,
serves discovery, list, watch, get, create, merge/JSON patch and delete with finalizers.
This subclass adds what a real API server does and kmock 0.8 does not:

- GET /api/v1/namespaces[/NAME] (kmock's path parser fails on it);
- server-set metadata on create: name from generateName, namespace, uid, creationTimestamp, generation,
  resourceVersion (one counter for every object, as etcd's revision);
- optimistic concurrency: a merge patch whose body carries metadata.resourceVersion is
  refused with 409 Conflict when that is not the object's current version (also on the
  status subresource); a JSON patch's "test" op on it fails with 422 (see below);
- delete preconditions (DeleteOptions.preconditions.uid / .resourceVersion): 409 Conflict
  when either differs from the object's, checked before finalizers are considered;
- a DELETE of an object with finalizers marks it as kube-apiserver does: deletionTimestamp,
  deletionGracePeriodSeconds 0, generation + 1, a new resourceVersion (a write: MODIFIED);
  removing the last finalizer then deletes it (DELETED);
- metadata.generation: bumped only when something outside metadata and status changes
  (a status write or a label change never bumps it), never taken from the client;
- 201 Created (the kubernetes client maps only 201 for custom-object creates);
- CRD registration (from files at start, or a POSTed CustomResourceDefinition);
- validation of custom resources against the CRD's openAPIV3Schema (422 Invalid),
  on create and on the patched result, and of its x-kubernetes-validations CEL rules on
  object properties (cel-python; transition rules with oldSelf on updates only);
- the status subresource isolated from the main resource, both ways;
- JSON patches: a failed "test" op is 422 (kopf relies on it), resourceVersion bumped;
- labelSelector on list and watch; ?dryRun answered without storing;
- watches that continue their list (?resourceVersion) without replaying or losing events;
- kind/apiVersion on lists;
- an audit log (env KMOCK_AUDIT_LOG): one JSON line per API request, for the RBAC test.

Every write (create, patch, delete) is checked and applied under one lock, so two
concurrent writers with the same resourceVersion see exactly one 200 and one 409.

Not emulated: authn/authz, admission, defaulting and pruning, server-side apply and
managedFields, PUT (kmock answers 404: neither the operator nor kopf uses it),
controllers (Jobs never get Pods: tests play the Job controller), ownerReference GC,
protobuf, watch bookmarks, 410 Gone, deletions between a list and its watch.

Usage: python kmock_server.py PORT [FILE.yaml ...]   (prints one "listening" line)
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import re
import signal
import sys
import uuid
from typing import Any

import aiohttp.web
import jsonpatch
import jsonpointer
import jsonschema
import kmock
import yaml
from kmock._internal import dicts, enums, parsing

_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    is_namespaces = parts[:3] == ["api", "v1", "namespaces"]
    if is_namespaces and (len(parts) in (3, 4) or (len(parts) == 5 and parts[4] in ("status", "finalize"))):
        name = parts[3] if len(parts) > 3 else None
        sub = parts[4] if len(parts) > 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, sub)
    return _original_parse_path(path)


parsing.parse_path = _parse_path

_resource_versions = itertools.count(1)
_CONFLICT = "the object has been modified; please apply your changes to the latest version and try again"


def _conflict(request: Any, message: str) -> kmock.KubernetesError:
    what = f"{request.resource.plural}.{request.resource.group}".rstrip(".")
    return kmock.KubernetesError(status=409, reason="Conflict",
                                 message=f'Operation cannot be fulfilled on {what} "{request.name}": {message}')


def _generation_payload(obj: dict[str, Any]) -> dict[str, Any]:
    """What metadata.generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
_schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
_SELECTOR_TERM = re.compile(r",(?![^()]*\))")
_SET_TERM = re.compile(r"(\S+)\s+(in|notin)\s+\((.*)\)")


def register_crd(emulator: kmock.KubernetesEmulator, crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    crd_names = spec["names"]
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        key = f"{spec['group']}/{version['name']}/{crd_names['plural']}"
        emulator.resources[key] = kmock.ResourceInfo(
            kind=crd_names["kind"],
            singular=crd_names.get("singular"),
            namespaced=spec.get("scope") == "Namespaced",
            shortnames=set(crd_names.get("shortNames", [])),
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            subresources=set((version.get("subresources") or {}).keys()),
        )
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema:
            _schemas[spec["group"], version["name"], crd_names["plural"]] = schema


def _validate(resource: Any, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
    schema = _schemas.get((resource.group, resource.version, resource.plural))
    if schema is None:
        return
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        first = errors[0]
        where = ".".join(map(str, first.absolute_path)) or "<root>"
        raise kmock.KubernetesError(status=422, reason="Invalid", message=f"{where}: {first.message}")
    _validate_cel(schema, obj, old, "")


def _validate_cel(schema: dict[str, Any], value: Any, old: Any, where: str) -> None:
    """The CRD's x-kubernetes-validations rules on object properties (not inside arrays),
    evaluated with cel-python: `self`, and `oldSelf` on an update (transition rules are
    skipped on create, as on a real server). Without cel-python (the test extra has it)
    the rules are not evaluated, as in kmock itself."""
    try:
        import celpy
    except ImportError:
        return

    for rule in schema.get("x-kubernetes-validations") or []:
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        env = celpy.Environment()
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        if not env.program(env.compile(rule["rule"])).evaluate(activation):
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"{where or '<root>'}: Invalid value: {message}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                _validate_cel(sub, value[key], old.get(key) if isinstance(old, dict) else None,
                              f"{where}.{key}".lstrip("."))


def selector_matches(obj: dict[str, Any], selector: str | None) -> bool:
    """Equality and set-based label selectors: a=b, a==b, a!=b, a, !a, a in (x,y), a notin (x)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in (t.strip() for t in _SELECTOR_TERM.split(selector or "")):
        if not term:
            continue
        if m := _SET_TERM.fullmatch(term):
            values = {v.strip() for v in m[3].split(",")}
            if (labels.get(m[1]) in values) != (m[2] == "in"):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _audit(request: Any) -> None:
    path = os.environ.get("KMOCK_AUDIT_LOG")
    if not path or request.resource is None:
        return
    record = {
        "agent": request.headers.get("User-Agent", ""),
        "verb": request.action.value if request.action else None,
        "group": request.resource.group,
        "plural": request.resource.plural,
        "subresource": request.subresource,
        "namespace": request.namespace,
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


_HISTORY_WINDOW = 512  # requests kept for kmock's matching (see RealisticEmulator._handle)


class RealisticEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the server-side behaviour listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._write_lock = asyncio.Lock()

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        # kmock keeps every request it ever served and matches each new one by scanning that
        # history: over a session-long server that is quadratic (one core busy for minutes).
        # Nothing here asserts on the history (tests read the audit log), so keep a window
        # far larger than the requests in flight at once.
        del self._requests[:-_HISTORY_WINDOW]
        _audit(request)
        if request.resource is not None and request.params.get("dryRun"):
            status = 201 if request.action == enums.action.CREATE else 200
            return aiohttp.web.json_response(request.data, status=status)
        writes = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        if request.resource is None or request.action not in writes:
            return await super()._handle(request)
        # check-then-write under one lock: the precondition seen is the state written over
        async with self._write_lock:
            if request.action == enums.action.DELETE:
                self._check_delete_preconditions(request)
                await self._mark_for_deletion(request)
            elif isinstance(request.data, dict):
                self._prepare_write(request)
            elif request.action == enums.action.UPDATE and isinstance(request.data, list):
                self._prepare_json_patch(request)
            response = await super()._handle(request)
        if request.action == enums.action.CREATE and response.status == 200:
            response.set_status(201)
        return response

    def _current(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if not request.name or key not in self.objects or self.objects[key].deleted:
            return None
        return dict(self.objects[key].raw)

    def _check_delete_preconditions(self, request: Any) -> None:
        options = request.data if isinstance(request.data, dict) else {}
        wanted = options.get("preconditions") or {}
        current = self._current(request)
        if current is None or not wanted:
            return
        meta = current.get("metadata") or {}
        if wanted.get("uid") and wanted["uid"] != meta.get("uid"):
            raise _conflict(request, f"Precondition failed: UID in precondition: {wanted['uid']}, "
                                     f"UID in object meta: {meta.get('uid')}")
        if wanted.get("resourceVersion") and wanted["resourceVersion"] != meta.get("resourceVersion"):
            raise _conflict(request, f"Precondition failed: ResourceVersion in precondition: "
                                     f"{wanted['resourceVersion']}, ResourceVersion in object meta: "
                                     f"{meta.get('resourceVersion')}")

    async def _mark_for_deletion(self, request: Any) -> None:
        """DELETE of an object with finalizers, as kube-apiserver's markAsDeleting does it:
        deletionTimestamp (RFC 3339) and deletionGracePeriodSeconds 0 are set, generation
        is bumped once (the first mark only), and it is a write: a new resourceVersion and
        a MODIFIED event. kmock 0.8 sets only the timestamp (and keeps the resourceVersion),
        after which its own DELETE branch sees the mark and leaves the object alone."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if not request.name or key not in self._objects or self._objects[key].deleted:
                return
            meta = self._objects[key].get("metadata", {})
            if meta.get("deletionTimestamp") or not meta.get("finalizers"):
                return
            mark: dict[str, Any] = {
                "deletionTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "deletionGracePeriodSeconds": 0, "resourceVersion": str(next(_resource_versions))}
            if int(meta.get("generation") or 0) > 0:
                mark["generation"] = int(meta["generation"]) + 1
            self._objects[key].patch({"metadata": mark})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": self._objects[key].raw})

    def _prepare_write(self, request: Any) -> None:
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {})
        info = self.resources[request.resource] if request.resource in self.resources else None
        has_status = bool(info and "status" in info.subresources)
        if request.action == enums.action.CREATE:
            if request.resource.plural == "customresourcedefinitions":
                register_crd(self, data)
            _validate(request.resource, data)
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            if not meta.get("name") and meta.get("generateName"):  # kopf's Events use it
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["uid"] = str(uuid.uuid4())  # server-set: a client's uid is ignored
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
            meta["resourceVersion"] = str(next(_resource_versions))
            if has_status:
                data.pop("status", None)
        elif request.action == enums.action.UPDATE:
            current = self._current(request)
            sent_rv = meta.get("resourceVersion")
            if current is not None and sent_rv and str(sent_rv) != str((current.get("metadata") or {}).get("resourceVersion")):
                raise _conflict(request, _CONFLICT)
            meta.pop("generation", None)  # server-owned
            if has_status and request.subresource == "status":
                for key in [k for k in data if k != "status"]:
                    data.pop(key)
                meta = data.setdefault("metadata", {})
            elif has_status:
                data.pop("status", None)
            if current is not None:
                result = dict(dicts.patch_dict(current, data))
                _validate(request.resource, result, current)
                generation = int((current.get("metadata") or {}).get("generation", 1))
                if _generation_payload(result) != _generation_payload(current):
                    generation += 1
                meta["generation"] = generation
            meta["resourceVersion"] = str(next(_resource_versions))

    def _prepare_json_patch(self, request: Any) -> None:
        """A JSON patch: its "test" ops must hold (kopf tests resourceVersion to patch
        finalizers optimistically; a failed test is 422, which kopf retries with a fresh
        read), the result must fit the schema, and it bumps resourceVersion."""
        current = self._current(request)
        if current is None:
            return
        try:
            result = jsonpatch.apply_patch(current, list(request.data), in_place=False)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"json patch: {exc}") from None
        _validate(request.resource, result, current)
        generation = int((current.get("metadata") or {}).get("generation", 1))
        if _generation_payload(result) != _generation_payload(current):
            request.data.append({"op": "add", "path": "/metadata/generation", "value": generation + 1})
        request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(next(_resource_versions))})

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        if selector := request.params.get("labelSelector"):
            result["items"] = [o for o in result["items"] if selector_matches(o, selector)]
        result["metadata"]["resourceVersion"] = str(next(_resource_versions))
        info = self.resources[request.resource] if request.resource in self.resources else None
        if info and info.kind:
            api_version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
            result = {"apiVersion": api_version, "kind": f"{info.kind}List", **result}
        return result

    async def _serve_watch(self, request: Any) -> Any:
        """Like kmock's watch, but continuous with a preceding list, as on a real server:
        the bus position is marked under the same lock as the snapshot (kmock 0.8 marks it
        after streaming the snapshot, so changes made in between are lost), and with
        ?resourceVersion=N only objects changed after that list are replayed."""
        yield b""
        selector = request.params.get("labelSelector")
        since = request.params.get("resourceVersion") or ""
        since_rv = int(since) if since.isdigit() else 0
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            snapshot = [obj.raw for obj in self._KubernetesEmulator__get_objs(request, strict=False) if not obj.deleted]
        try:
            for raw in snapshot:
                version = str((raw.get("metadata") or {}).get("resourceVersion") or "0")
                if since_rv and version.isdigit() and int(version) <= since_rv:
                    continue  # the client's list already had this state
                if selector_matches(raw, selector):
                    yield {"type": "MODIFIED" if since_rv else "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                obj = event.get("object", {})
                meta = obj.get("metadata", {})
                if not self._KubernetesEmulator__check(request, request.resource, meta.get("namespace"),
                                                       meta.get("name"), strict=False):
                    continue
                if selector_matches(obj, selector):
                    yield event
        finally:
            await bus.unmark(marker)


async def serve(port: int, files: list[str]) -> None:
    async with RealisticEmulator() as emulator, kmock.Server(emulator, host="127.0.0.1", port=port) as server:
        emulator.resources.load_bundled()
        for path in files:
            with open(path, encoding="utf-8") as fh:
                for doc in yaml.safe_load_all(fh):
                    if doc and doc.get("kind") == "CustomResourceDefinition":
                        register_crd(emulator, doc)
        print(f"kmock listening on {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2:]))
