"""The administrator's policy for OverlayJobs (chart value `policy`), checked by the operator.

The chart renders the same policy into a ValidatingAdmissionPolicy (CEL), so a resource
that breaks it is refused at create time on clusters that enforce admission policies;
the operator checks it again before it does anything (a cluster without the admission
policy, a policy changed after the resource was admitted) and fails the resource with a
`Failed` condition whose reason says which rule and whose message names the rule.

Rules (names as in the chart's values and the admission policy's messages):

- `imageVolumes`: the image must be on a listed volume: a hostPath under one of the
  prefixes, or a listed PVC, each for every namespace or only for the listed ones;
- `runnerImage`: the pod that mounts the overlay runs the operator's pinned runner image;
  a resource may not choose another one (`spec.workload.image` absent or equal to it);
- `runAsUser` / `runAsGroup`: the user's command runs as this uid/gid, never 0, within
  the administrator's bounds (default when the resource names none: `defaultUser`);
- `workloadVolumes`: volumes of `spec.workload.template` only of the listed types (never
  hostPath), mounted only outside the paths the runner uses;
- `workloadEnv`: no environment variable that steers the root runner before it drops to
  the job user (the container's env is the runner's env): the dynamic loader's and
  Python's variables, PATH, HOME, TMPDIR, the shells' startup files, glibc tunables,
  sifoverlay's own settings.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sifoverlay.errors import UsageError
from sifoverlay.k8s import well_known as wk

RULE_IMAGE_VOLUMES = "imageVolumes"
RULE_RUNNER_IMAGE = "runnerImage"
RULE_RUN_AS_USER = "runAsUser"
RULE_RUN_AS_GROUP = "runAsGroup"
RULE_WORKLOAD_VOLUMES = "workloadVolumes"
RULE_WORKLOAD_ENV = "workloadEnv"
# names (regex, full match) the runner's environment must not take from the user
FORBIDDEN_ENV = r"(LD_|PYTHON|SIFOVERLAY_|GCONV_|MALLOC_|GLIBC_|XDG_|LOCPATH|NLSPATH|HOSTALIASES|RES_OPTIONS).*|PATH|HOME|TMPDIR|IFS|ENV|BASH_ENV|SHELLOPTS"
DEFAULT_VOLUME_TYPES = ("configMap", "secret", "emptyDir", "projected", "downwardAPI", "persistentVolumeClaim",
                        "ephemeral")
RESERVED_VOLUMES = ("image", "work", "fuse")
RESERVED_MOUNT_PATHS = ("/sifoverlay", wk.WORK_MOUNT_PATH, "/dev", "/proc", "/sys")
MAX_ID = 2**31 - 1


class PolicyViolation(UsageError):
    """A resource the administrator's policy refuses; `reason` is the condition reason."""

    def __init__(self, where: str | None, message: str, *, reason: str, rule: str) -> None:
        super().__init__(where, message)
        self.reason = reason
        self.rule = rule


@dataclass(frozen=True, slots=True)
class VolumeRule:
    name: str
    kind: str  # "hostPath" | "persistentVolumeClaim"
    source: str  # hostPath prefix (normalised, no trailing '/') or claim name
    namespaces: tuple[str, ...] = ()  # empty: every namespace

    def applies_to(self, namespace: str) -> bool:
        return not self.namespaces or namespace in self.namespaces

    def allows(self, kind: str, source: str, namespace: str) -> bool:
        if kind != self.kind or not self.applies_to(namespace):
            return False
        if kind == "hostPath":
            return source == self.source or source.startswith(self.source + "/")
        return source == self.source

    def describe(self) -> str:
        where = ",".join(self.namespaces) if self.namespaces else "all namespaces"
        what = f"hostPath {self.source}/..." if self.kind == "hostPath" else f"PVC {self.source}"
        return f"{self.name} ({what}; {where})"


@dataclass(frozen=True, slots=True)
class IdRange:
    min: int = 1000
    max: int = MAX_ID

    def check(self, value: int) -> bool:
        return value != 0 and self.min <= value <= self.max


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    image_volumes: tuple[VolumeRule, ...] = ()
    run_as_user: IdRange = field(default_factory=IdRange)
    run_as_group: IdRange = field(default_factory=IdRange)
    default_user: tuple[int, int] = (65534, 65534)  # nobody:nogroup when the resource names none
    volume_types: tuple[str, ...] = DEFAULT_VOLUME_TYPES


def normalized_host_path(path: str) -> bool:
    """Absolute, no '.', '..' or empty segments, no trailing '/': what the prefix check and
    the admission policy's string comparison assume."""
    return path.startswith("/") and path != "/" and all(part not in ("", ".", "..") for part in path[1:].split("/"))


def _id_range(data: Mapping[str, Any] | None, default: IdRange) -> IdRange:
    if not data:
        return default
    return IdRange(int(data.get("min", default.min)), int(data.get("max", default.max)))


def from_json(text: str) -> AdminPolicy:
    """The policy the chart puts in SIFOVERLAY_POLICY (JSON of values.policy). Empty: the
    default - no image volume allowed at all (fail closed)."""
    if not text.strip():
        return AdminPolicy()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(None, f"SIFOVERLAY_POLICY is not JSON: {exc}") from None
    rules = []
    for item in data.get("imageVolumes") or []:
        namespaces = tuple(item.get("namespaces") or ())
        if item.get("hostPathPrefix"):
            prefix = str(item["hostPathPrefix"]).rstrip("/")
            if not normalized_host_path(prefix):
                raise UsageError(None, f"policy.imageVolumes {item.get('name')!r}: hostPathPrefix {prefix!r} must be "
                                       "an absolute, normalised path other than /")
            rules.append(VolumeRule(str(item["name"]), "hostPath", prefix, namespaces))
        elif item.get("persistentVolumeClaim"):
            rules.append(VolumeRule(str(item["name"]), "persistentVolumeClaim", str(item["persistentVolumeClaim"]),
                                    namespaces))
        else:
            raise UsageError(None, f"policy.imageVolumes {item!r} needs hostPathPrefix or persistentVolumeClaim")
    user = data.get("defaultUser") or {}
    return AdminPolicy(
        image_volumes=tuple(rules),
        run_as_user=_id_range(data.get("runAsUser"), IdRange()),
        run_as_group=_id_range(data.get("runAsGroup"), IdRange()),
        default_user=(int(user.get("uid", 65534)), int(user.get("gid", 65534))),
        volume_types=tuple(data.get("workloadVolumeTypes") or DEFAULT_VOLUME_TYPES),
    )


def _template_spec(workload: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((workload.get("template") or {}).get("spec") or {})


def _template_container(workload: Mapping[str, Any]) -> Mapping[str, Any]:
    containers: Sequence[Mapping[str, Any]] = _template_spec(workload).get("containers") or []
    return containers[0] if containers else {}


def run_as(spec: Mapping[str, Any], policy: AdminPolicy) -> tuple[int, int]:
    workload = spec.get("workload") or {}
    uid = workload.get("runAsUser")
    gid = workload.get("runAsGroup")
    if uid is None:
        return policy.default_user if gid is None else (policy.default_user[0], int(gid))
    return int(uid), int(uid if gid is None else gid)


def check(body: Mapping[str, Any], policy: AdminPolicy, *, runner_image: str) -> None:
    """Raise PolicyViolation for the first rule `body` breaks (order: imageVolumes,
    runnerImage, runAsUser, runAsGroup, workloadVolumes)."""
    meta, spec = body["metadata"], body["spec"]
    namespace = meta["namespace"]
    where = f"OverlayJob {namespace}/{meta['name']}"
    image = spec.get("image") or {}
    host = (image.get("hostPath") or {}).get("path")
    claim = (image.get("persistentVolumeClaim") or {}).get("claimName")
    kind, source = ("hostPath", str(host)) if host else ("persistentVolumeClaim", str(claim or ""))
    if kind == "hostPath" and not normalized_host_path(source):
        raise PolicyViolation(where, f"rule {RULE_IMAGE_VOLUMES}: spec.image.hostPath.path {source!r} must be an "
                                     "absolute path without '.', '..' or empty segments",
                              reason=wk.REASON_IMAGE_VOLUME_NOT_ALLOWED, rule=RULE_IMAGE_VOLUMES)
    if not any(rule.allows(kind, source, namespace) for rule in policy.image_volumes):
        candidates = [r.describe() for r in policy.image_volumes if r.applies_to(namespace)]
        what = f"hostPath {source}" if kind == "hostPath" else f"PVC {source}"
        raise PolicyViolation(where, f"rule {RULE_IMAGE_VOLUMES}: {what} is not an image volume allowed in namespace "
                                     f"{namespace} (allowed: {'; '.join(candidates) or 'none'})",
                              reason=wk.REASON_IMAGE_VOLUME_NOT_ALLOWED, rule=RULE_IMAGE_VOLUMES)
    workload = spec.get("workload") or {}
    chosen = workload.get("image")
    if chosen and chosen != runner_image:
        raise PolicyViolation(where, f"rule {RULE_RUNNER_IMAGE}: the overlay is mounted by the operator's runner image "
                                     f"{runner_image}; spec.workload.image {chosen!r} is not allowed",
                              reason=wk.REASON_RUNNER_IMAGE_NOT_ALLOWED, rule=RULE_RUNNER_IMAGE)
    uid, gid = run_as(spec, policy)
    if not policy.run_as_user.check(uid):
        raise PolicyViolation(where, f"rule {RULE_RUN_AS_USER}: uid {uid} is outside "
                                     f"{policy.run_as_user.min}..{policy.run_as_user.max} (never 0)",
                              reason=wk.REASON_USER_NOT_ALLOWED, rule=RULE_RUN_AS_USER)
    if not policy.run_as_group.check(gid):
        raise PolicyViolation(where, f"rule {RULE_RUN_AS_GROUP}: gid {gid} is outside "
                                     f"{policy.run_as_group.min}..{policy.run_as_group.max} (never 0)",
                              reason=wk.REASON_USER_NOT_ALLOWED, rule=RULE_RUN_AS_GROUP)
    for env in [*(workload.get("env") or []), *(_template_container(workload).get("env") or [])]:
        if re.fullmatch(FORBIDDEN_ENV, str(env.get("name") or "")):
            raise PolicyViolation(where, f"rule {RULE_WORKLOAD_ENV}: environment variable {env.get('name')!r} would steer "
                                         "the root runner before it drops to the job user; not allowed",
                                  reason=wk.REASON_ENV_NOT_ALLOWED, rule=RULE_WORKLOAD_ENV)
    volumes = _template_spec(workload).get("volumes") or []
    names = set()
    for volume in volumes:
        name = str(volume.get("name") or "")
        kinds = [k for k in volume if k != "name"]
        if name in RESERVED_VOLUMES or len(kinds) != 1 or kinds[0] not in policy.volume_types:
            raise PolicyViolation(where, f"rule {RULE_WORKLOAD_VOLUMES}: volume {name!r} ({', '.join(kinds) or 'no source'}) "
                                         f"is not allowed (allowed types: {', '.join(policy.volume_types)}; reserved "
                                         f"names: {', '.join(RESERVED_VOLUMES)})",
                                  reason=wk.REASON_VOLUME_NOT_ALLOWED, rule=RULE_WORKLOAD_VOLUMES)
        names.add(name)
    for mount in _template_container(workload).get("volumeMounts") or []:
        path = str(mount.get("mountPath") or "")
        norm = posixpath.normpath(path) if path.startswith("/") else ""
        reserved = [r for r in RESERVED_MOUNT_PATHS if norm == r or norm.startswith(r + "/") or r.startswith(norm + "/")]
        if mount.get("name") not in names or not norm or norm != path.rstrip("/") or norm == "/" or reserved:
            raise PolicyViolation(where, f"rule {RULE_WORKLOAD_VOLUMES}: volumeMount {mount.get('name')!r} at {path!r} "
                                         "must name a volume of the template and an absolute, normalised path outside "
                                         f"{', '.join(RESERVED_MOUNT_PATHS)}",
                                  reason=wk.REASON_VOLUME_NOT_ALLOWED, rule=RULE_WORKLOAD_VOLUMES)
