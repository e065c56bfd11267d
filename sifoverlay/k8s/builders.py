"""Pure builders: plain values in, the dicts the operator sends to the API server out.

Nothing here talks to a server, reads the clock or the environment: callers pass `now`
and the operator's settings (`PodPolicy`), so every builder is tested against an exact
dict. Conditions follow metav1.Condition (type, status, reason, message,
observedGeneration, lastTransitionTime).
"""

from __future__ import annotations

import datetime as dt
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sifoverlay.errors import UsageError
from sifoverlay.k8s import names
from sifoverlay.k8s import policy as pol
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.policy import AdminPolicy

Obj = dict[str, Any]


# --- the image a resource names ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where an OverlayJob's OCI-SIF lives: a volume (hostPath dir or PVC) plus a path on it."""

    kind: str  # "hostPath" | "persistentVolumeClaim"
    source: str  # the host directory, or the claim name
    path: str  # relative path of the OCI-SIF on the volume
    namespace: str  # the resource's namespace (a PVC is namespaced)

    @property
    def identity(self) -> str:
        """Stable identity of the image across resources: a hostPath image is the same
        file for every namespace, a PVC image is scoped by the claim's namespace."""
        if self.kind == "hostPath":
            return f"hostPath:{self.source}:{self.path}"
        return f"pvc:{self.namespace}/{self.source}:{self.path}"

    @property
    def pod_path(self) -> str:
        return posixpath.join(wk.IMAGE_MOUNT_PATH, self.path)

    def volume(self) -> Obj:
        if self.kind == "hostPath":
            return {"name": "image", "hostPath": {"path": self.source, "type": "Directory"}}
        return {"name": "image", "persistentVolumeClaim": {"claimName": self.source}}

    def local_parts(self, roots: Mapping[str, str]) -> tuple[str, str] | None:
        """(volume root in the operator's filesystem, the image's path beneath it), if the
        image's volume is mounted there: `roots` maps "hostPath:/dir" or "pvc:ns/claim" to
        a local directory; a hostPath image under a mounted hostPath directory counts too
        (the operator mounts /data/images, the resource names /data/images/team-a)."""
        if self.kind != "hostPath":
            root = roots.get(f"pvc:{self.namespace}/{self.source}")
            return None if root is None else (root, self.path)
        for key, root in roots.items():
            kind, _, host = key.partition(":")
            host = host.rstrip("/") or "/"
            if kind != "hostPath":
                continue
            if self.source == host:
                return root, self.path
            if self.source.startswith(host.rstrip("/") + "/"):
                return root, posixpath.join(self.source[len(host.rstrip("/")) + 1:], self.path)
        return None

    def local_path(self, roots: Mapping[str, str]) -> str | None:
        """The image's path inside the operator's own filesystem (see local_parts)."""
        parts = self.local_parts(roots)
        return None if parts is None else posixpath.join(*parts)


def image_ref(spec: Mapping[str, Any], namespace: str, *, name: str = "") -> ImageRef:
    """Validate spec.image (the parts the CRD schema cannot express) and return it."""
    image = spec.get("image") or {}
    where = f"OverlayJob {namespace}/{name}" if name else f"OverlayJob in {namespace}"
    path = str(image.get("path") or "")
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or "" in parts[:-1]:
        raise UsageError(where, f"spec.image.path {path!r} must be a relative path on the volume without '..'")
    host = (image.get("hostPath") or {}).get("path")
    claim = (image.get("persistentVolumeClaim") or {}).get("claimName")
    if bool(host) == bool(claim):
        raise UsageError(where, "spec.image needs exactly one of hostPath.path or persistentVolumeClaim.claimName")
    if host:
        if not str(host).startswith("/"):
            raise UsageError(where, f"spec.image.hostPath.path {host!r} must be absolute")
        return ImageRef("hostPath", posixpath.normpath(str(host)), posixpath.normpath(path), namespace)
    return ImageRef("persistentVolumeClaim", str(claim), posixpath.normpath(path), namespace)


# --- pod privileges ----------------------------------------------------------------------------
FUSE_DEVICE_PLUGIN = "devicePlugin"
FUSE_HOST_PATH = "hostPath"
FUSE_PRIVILEGED = "privileged"


@dataclass(frozen=True, slots=True)
class PodPolicy:
    """How the operator gives workload pods FUSE (chart values `workload.*`).

    devicePlugin: a device plugin injects /dev/fuse (and its device-cgroup rule) for the
      extended resource `fuse_resource`; the pod adds only CAP_SYS_ADMIN for mount(2).
    hostPath: /dev/fuse is a hostPath CharDevice plus CAP_SYS_ADMIN; works only where the
      runtime's device cgroup allows c 10:229 (not the CRI default).
    privileged: a fully privileged container; the last resort, also what kernel mounts
      (spec.mountMode: kernel, loop devices) need, allowed only with allow_kernel_mounts.
    """

    fuse_access: str = FUSE_DEVICE_PLUGIN
    fuse_resource: str = "smarter-devices/fuse"
    user_namespaces: bool = False  # hostUsers: false - SYS_ADMIN then only counts in the pod's userns
    apparmor_unconfined: bool = True  # the runtime's default AppArmor profile denies mount(2)
    allow_kernel_mounts: bool = False
    service_account: str | None = None
    # the operator's own pinned image: the runner of workload pods and of reconcile Jobs
    operator_image: str = "ghcr.io/sifoverlay/operator:0.1.0"
    journal_dir: str = "/var/lib/sifoverlay/journal"
    admin: AdminPolicy = field(default_factory=AdminPolicy)


JOURNAL_ON_VOLUME = ".sifoverlay-journal"
STATE_ON_VOLUME = ".sifoverlay-state"  # engine state dir (lease records, scratch): shared on the volume


def volume_state() -> str:
    """The engine's state directory on the image's volume, as pods see it: lease records
    there are the ones the operator (config.OperatorConfig.state_for) sees."""
    return posixpath.join(wk.IMAGE_MOUNT_PATH, STATE_ON_VOLUME)


def volume_journal() -> str:
    """The journal directory on the image's volume, as pods see it (the operator uses the
    same directory through its own mount: config.OperatorConfig.journal_for)."""
    return posixpath.join(wk.IMAGE_MOUNT_PATH, JOURNAL_ON_VOLUME)


def _owner_reference(body: Mapping[str, Any]) -> Obj:
    meta = body["metadata"]
    return {
        "apiVersion": wk.API_VERSION,
        "kind": wk.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(body: Mapping[str, Any], ref: ImageRef, role: str) -> dict[str, str]:
    return {
        wk.LABEL_MANAGED_BY: wk.MANAGED_BY_VALUE,
        wk.LABEL_OVERLAYJOB: names.fit(body["metadata"]["name"]),
        wk.LABEL_ROLE: role,
        wk.LABEL_IMAGE_KEY: names.image_key(ref.identity),
    }


def _annotations(body: Mapping[str, Any], ref: ImageRef) -> dict[str, str]:
    return {wk.ANNOTATION_OVERLAYJOB: body["metadata"]["name"], wk.ANNOTATION_IMAGE_IDENTITY: ref.identity}


# The runner (root in the container) mounts the overlay and then drops to the job user
# inside the rootfs (runtime.enter: setgroups/setgid/setuid, then no_new_privs). It needs:
# SYS_ADMIN (mount(2) for FUSE), SETUID/SETGID (FUSE daemons and the command run as the
# job user), CHOWN (the mount points belong to the job user), DAC_OVERRIDE/FOWNER (the
# image file belongs to its owner; the runner appends to it at the at-exit sync). The
# user's command keeps none: a uid 0 -> non-0 transition clears the permitted set.
RUNNER_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "SYS_ADMIN")


def _security_context(policy: PodPolicy, privileged: bool) -> Obj:
    if privileged:
        return {"privileged": True}
    ctx: Obj = {
        "runAsUser": 0,
        "runAsGroup": 0,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": list(RUNNER_CAPABILITIES)},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if policy.apparmor_unconfined:
        ctx["appArmorProfile"] = {"type": "Unconfined"}
    return ctx


# the PodSpec subset spec.workload.template.spec passes through to the workload pod
TEMPLATE_POD_FIELDS = ("tolerations", "affinity", "nodeSelector", "runtimeClassName", "priorityClassName")


def workload_job(body: Mapping[str, Any], *, policy: PodPolicy) -> Obj:
    """The child Job: one pod, no retries (a retry would run on a half-written overlay
    without a reconcile in between). Its only container is the operator's runner image,
    whose entrypoint mounts the overlay with FUSE and runs the user's command in the
    image's rootfs as the job user: `sifoverlay exec [--writable] --user UID:GID IMAGE -- CMD`.
    The administrator's policy is checked first (PolicyViolation)."""
    meta, spec = body["metadata"], body["spec"]
    ref = image_ref(spec, meta["namespace"], name=meta["name"])
    pol.check(body, policy.admin, runner_image=policy.operator_image)
    workload = spec["workload"]
    kernel = spec.get("mountMode", "fuse") == "kernel"
    if kernel and not policy.allow_kernel_mounts:
        raise UsageError(f"OverlayJob {meta['namespace']}/{meta['name']}",
                         "spec.mountMode kernel is disabled by the operator (workload.allowKernelMounts)")
    writable = spec.get("mode", "rw") == "rw"
    privileged = kernel or policy.fuse_access == FUSE_PRIVILEGED
    labels = _labels(body, ref, wk.ROLE_WORKLOAD)
    job_id = names.session_job_id(meta["namespace"], meta["name"], meta["uid"])
    uid, gid = pol.run_as(spec, policy.admin)
    template = (workload.get("template") or {}).get("spec") or {}
    tcontainer: Mapping[str, Any] = (template.get("containers") or [{}])[0]
    # The user's volumes are mounted in the runner container only below USER_MOUNT_ROOT (they
    # never cover the runner's own files: /usr, /etc, PATH) and bound into the image's
    # rootfs at the path the user asked for.
    user_mounts: list[Obj] = []
    binds: list[str] = []
    for m in tcontainer.get("volumeMounts") or []:
        staged = posixpath.join(wk.USER_MOUNT_ROOT, str(m["name"]))
        user_mounts.append({"name": m["name"], "mountPath": staged, **({"readOnly": True} if m.get("readOnly") else {})})
        binds.append(f"--bind={staged}:{m['mountPath']}{':ro' if m.get('readOnly') else ''}")
    # The journal lives on the image's volume, not in the pod: if the pod dies in the middle
    # of its own at-exit sync, the operator (or a reconcile Job) finds and recovers the entry.
    # the runner is root and the operator is the admin: the root-only options are meant
    entry = ["sifoverlay", "exec", "--allow-root-options", *(["--writable"] if writable else []),
             "--mount", "kernel" if kernel else "fuse",
             "--job-id", job_id, "--journal-dir", volume_journal(), f"--user={uid}:{gid}", *binds,
             ref.pod_path, "--", *workload["command"]]
    env = [{"name": e["name"], "value": str(e.get("value", ""))} for e in workload.get("env", [])]
    env += [dict(e) for e in tcontainer.get("env") or []]
    env.append({"name": wk.ENV_STATE_DIR, "value": volume_state()})  # last: the user's env cannot move it
    # quantities travel as strings (the CRD accepts int-or-string, the Job API wants strings)
    raw_resources = tcontainer.get("resources") or workload.get("resources") or {}
    resources: Obj = {k: {rk: str(rv) for rk, rv in v.items()} for k, v in raw_resources.items()}
    mounts: list[Obj] = [
        # writable even for mode ro: readers take a shared lease file beside the image
        {"name": "image", "mountPath": wk.IMAGE_MOUNT_PATH},
        {"name": "work", "mountPath": wk.WORK_MOUNT_PATH},
        *user_mounts,
    ]
    volumes: list[Obj] = [ref.volume(), {"name": "work", "emptyDir": {}},
                          *(dict(v) for v in template.get("volumes") or [])]
    if not privileged and policy.fuse_access == FUSE_DEVICE_PLUGIN:
        for key in ("limits", "requests"):
            resources.setdefault(key, {})[policy.fuse_resource] = "1"
    elif not privileged and policy.fuse_access == FUSE_HOST_PATH:
        mounts.append({"name": "fuse", "mountPath": wk.FUSE_DEVICE})
        volumes.append({"name": "fuse", "hostPath": {"path": wk.FUSE_DEVICE, "type": "CharDevice"}})
    container: Obj = {
        "name": wk.WORKLOAD_CONTAINER,
        "image": policy.operator_image,
        "command": entry,
        "env": env,
        "securityContext": _security_context(policy, privileged),
        "volumeMounts": mounts,
    }
    if resources:
        container["resources"] = resources
    pod_spec: Obj = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
    if policy.user_namespaces and not privileged:
        pod_spec["hostUsers"] = False
    node_selector = {**(workload.get("nodeSelector") or {}), **(template.get("nodeSelector") or {})}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    for key in TEMPLATE_POD_FIELDS:
        if key != "nodeSelector" and template.get(key):
            pod_spec[key] = template[key]
    if workload.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = workload["serviceAccountName"]
    else:
        pod_spec["automountServiceAccountToken"] = False  # the runner needs no API access
    return {
        "apiVersion": wk.JOB_API_VERSION,
        "kind": "Job",
        "metadata": {
            "name": names.workload_job_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": _annotations(body, ref),
            "ownerReferences": [_owner_reference(body)],
        },
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"labels": dict(labels), "annotations": _annotations(body, ref)}, "spec": pod_spec},
        },
    }


def reconcile_job(body: Mapping[str, Any], *, policy: PodPolicy) -> Obj:
    """A short Job for images on a volume the operator does not mount (a PVC in the
    user's namespace): recover any interrupted commit, then sync, printing the JSON
    result into the termination message the operator reads from the Pod status.
    It needs no FUSE: reconcile only reads and appends bytes of the image file."""
    meta, spec = body["metadata"], body["spec"]
    ref = image_ref(spec, meta["namespace"], name=meta["name"])
    job_id = names.session_job_id(meta["namespace"], meta["name"], meta["uid"])
    script = 'sifoverlay recover "$1" >/dev/null && sifoverlay overlay sync "$1" --job "$2" --json >/dev/termination-log'
    labels = _labels(body, ref, wk.ROLE_RECONCILE)
    container: Obj = {
        "name": wk.RECONCILE_CONTAINER,
        "image": policy.operator_image,
        "command": ["/bin/sh", "-c", script, "reconcile", ref.pod_path, job_id],
        "env": [{"name": wk.ENV_JOURNAL_DIR, "value": volume_journal()},
                {"name": wk.ENV_STATE_DIR, "value": volume_state()}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "image", "mountPath": wk.IMAGE_MOUNT_PATH}],
    }
    return {
        "apiVersion": wk.JOB_API_VERSION,
        "kind": "Job",
        "metadata": {
            "name": names.reconcile_job_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": _annotations(body, ref),
            "ownerReferences": [_owner_reference(body)],
        },
        "spec": {
            "backoffLimit": 3,  # recover + sync is idempotent: retrying is safe
            "template": {
                "metadata": {"labels": dict(labels), "annotations": _annotations(body, ref)},
                "spec": {"restartPolicy": "Never", "containers": [container], "volumes": [ref.volume()]},
            },
        },
    }


# --- Leases ---------------------------------------------------------------------------------------
def micro_time(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lease(ref: ImageRef, *, namespace: str, holder_namespace: str, holder_name: str, holder_uid: str,
          now: dt.datetime, duration_seconds: int) -> Obj:
    """The image's Lease held by one OverlayJob. `holderIdentity` is "namespace/name" so a
    waiting resource can name the holder; the uid tells a re-created namesake apart."""
    return {
        "apiVersion": wk.LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": {
            "name": names.lease_name(ref.identity),
            "namespace": namespace,
            "labels": {wk.LABEL_MANAGED_BY: wk.MANAGED_BY_VALUE, wk.LABEL_IMAGE_KEY: names.image_key(ref.identity)},
            "annotations": {wk.ANNOTATION_IMAGE_IDENTITY: ref.identity, wk.ANNOTATION_HOLDER_UID: holder_uid},
        },
        "spec": {
            "holderIdentity": f"{holder_namespace}/{holder_name}",
            "leaseDurationSeconds": duration_seconds,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
        },
    }


def lease_holder(lease_obj: Mapping[str, Any]) -> tuple[str, str]:
    """(holderIdentity, holder uid) of a Lease dict."""
    spec = lease_obj.get("spec") or {}
    annotations = (lease_obj.get("metadata") or {}).get("annotations") or {}
    return str(spec.get("holderIdentity") or ""), str(annotations.get(wk.ANNOTATION_HOLDER_UID) or "")


# --- conditions and status -------------------------------------------------------------------------
def condition(ctype: str, status: bool, reason: str, message: str, *, generation: int, now: dt.datetime) -> Obj:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": " ".join(message.split()),
        "observedGeneration": generation,
        "lastTransitionTime": rfc3339(now),
    }


def set_conditions(existing: Iterable[Mapping[str, Any]], *updates: Obj) -> list[Obj]:
    """Merge `updates` into `existing` by type. lastTransitionTime changes only when the
    status flips (metav1 semantics); order: CONDITION_TYPES, then unknown types."""
    by_type: dict[str, Obj] = {str(c["type"]): dict(c) for c in existing}
    for new in updates:
        old = by_type.get(new["type"])
        merged = dict(new)
        if old is not None and old.get("status") == new["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        by_type[new["type"]] = merged
    order = {t: i for i, t in enumerate(wk.CONDITION_TYPES)}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def condition_of(status: Mapping[str, Any] | None, ctype: str) -> Obj | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None
