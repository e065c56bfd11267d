"""The operator's settings, read once from its environment (the chart sets them).

| variable | meaning | default |
|---|---|---|
| SIFOVERLAY_LEASE_NAMESPACE | namespace of the per-image Leases (one writer cluster-wide) | POD_NAMESPACE or "default" |
| SIFOVERLAY_VOLUME_ROOTS | `KEY=DIR,...`: image volumes mounted into the operator, KEY is `hostPath:/dir` or `pvc:ns/claim` | none |
| SIFOVERLAY_JOURNAL_DIR | the operator's journal (sessions, commit records) | `.sifoverlay-journal` on each image volume |
| SIFOVERLAY_STATE_DIR | the engine's state directory (lease records, scratch) | `.sifoverlay-state` on each image volume |
| SIFOVERLAY_LEASE_RETRY_SECONDS | how often a waiting resource retries the Lease | 10 |
| SIFOVERLAY_RECHECK_SECONDS | level-based re-check of running/reconciling resources | 30 |
| SIFOVERLAY_DRIFT_SECONDS | drift check (engine.status) of finished resources | 300 |
| SIFOVERLAY_METRICS_PORT | Prometheus port, 0 = off | 8081 |
| SIFOVERLAY_METRICS_ADDR | address the metrics server binds | 0.0.0.0 |
| SIFOVERLAY_FUSE_ACCESS | devicePlugin, hostPath or privileged (see builders.PodPolicy) | devicePlugin |
| SIFOVERLAY_FUSE_RESOURCE | the device plugin's extended resource for /dev/fuse | smarter-devices/fuse |
| SIFOVERLAY_USER_NAMESPACES | "true": workload pods get hostUsers: false | false |
| SIFOVERLAY_APPARMOR_UNCONFINED | "true": workload pods run AppArmor-unconfined (mount(2)) | true |
| SIFOVERLAY_ALLOW_KERNEL_MOUNTS | "true": honour spec.mountMode: kernel (privileged pods) | false |
| SIFOVERLAY_OPERATOR_IMAGE | the pinned runner image of workload pods and reconcile Jobs | ghcr.io/sifoverlay/operator:0.1.0 |
| SIFOVERLAY_POLICY | the admin policy, JSON of the chart's `policy` value (see k8s/policy.py) | none: no image volume allowed |
| SIFOVERLAY_MIN_FREE_BYTES | a rw OverlayJob whose overlay has fewer bytes available fails at admission (0: no minimum) | 0 |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from sifoverlay.errors import UsageError
from sifoverlay.k8s import policy as pol
from sifoverlay.k8s.builders import (
    FUSE_DEVICE_PLUGIN, FUSE_HOST_PATH, FUSE_PRIVILEGED, JOURNAL_ON_VOLUME, STATE_ON_VOLUME, ImageRef, PodPolicy,
)


# Outside 9100-9999, the Prometheus exporter range (fully allocated on the Prometheus
# wiki's default port allocations page, 9108 being the graphite exporter), and not 9090-9094
# (Prometheus, Pushgateway, Alertmanager); next to kopf's liveness port 8080 in the same pod.
METRICS_PORT = 8081


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    lease_namespace: str = "default"
    volume_roots: Mapping[str, str] = field(default_factory=dict)
    journal_dir: str | None = None
    state_dir: str | None = None
    lease_retry_seconds: float = 10.0
    recheck_seconds: float = 30.0
    drift_seconds: float = 300.0
    metrics_port: int = METRICS_PORT
    metrics_addr: str = "0.0.0.0"
    pod_policy: PodPolicy = field(default_factory=PodPolicy)
    min_free_bytes: int = 0  # capacity pre-flight of rw workloads (engine/capacity.py), like plugstack min_free

    def journal_for(self, ref: ImageRef) -> str | None:
        """Where the journal of `ref`'s commits and sessions lives: SIFOVERLAY_JOURNAL_DIR,
        else a directory on the image's own volume, so that it survives the operator pod
        moving to another node and is the same one reconcile Jobs use."""
        if self.journal_dir:
            return self.journal_dir
        local = ref.local_path(self.volume_roots)
        root = None if local is None else local[: len(local) - len(ref.path)].rstrip("/")
        return None if root is None else os.path.join(root, JOURNAL_ON_VOLUME)

    def state_for(self, ref: ImageRef) -> str | None:
        """The engine's state directory (lease records, scratch: engine/statedir.py) for
        `ref`: SIFOVERLAY_STATE_DIR, else `.sifoverlay-state` on the image's volume - the
        directory the workload pods and reconcile Jobs use there, so their file leases and
        the operator's meet. It must be root-owned and not writable by others."""
        if self.state_dir:
            return self.state_dir
        local = ref.local_path(self.volume_roots)
        root = None if local is None else local[: len(local) - len(ref.path)].rstrip("/")
        return None if root is None else os.path.join(root, STATE_ON_VOLUME)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise UsageError(None, f"{name}={value!r} is not a boolean (true/false)")


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise UsageError(None, f"{name}={value!r} is not a number") from None
    if number < 0:
        raise UsageError(None, f"{name}={value!r} must not be negative")
    return number


def parse_volume_roots(text: str) -> dict[str, str]:
    roots: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, directory = item.rpartition("=")
        if not sep or not key.startswith(("hostPath:/", "pvc:")) or not directory.startswith("/"):
            raise UsageError(None, f"SIFOVERLAY_VOLUME_ROOTS entry {item!r} is not hostPath:/DIR=/LOCAL or pvc:NS/CLAIM=/LOCAL")
        roots[key] = directory
    return roots


def from_env(env: Mapping[str, str] | None = None) -> OperatorConfig:
    env = os.environ if env is None else env
    fuse = env.get("SIFOVERLAY_FUSE_ACCESS") or FUSE_DEVICE_PLUGIN
    if fuse not in (FUSE_DEVICE_PLUGIN, FUSE_HOST_PATH, FUSE_PRIVILEGED):
        raise UsageError(None, f"SIFOVERLAY_FUSE_ACCESS={fuse!r} is not devicePlugin, hostPath or privileged")
    defaults = PodPolicy()
    policy = PodPolicy(
        fuse_access=fuse,
        fuse_resource=env.get("SIFOVERLAY_FUSE_RESOURCE") or defaults.fuse_resource,
        user_namespaces=_flag(env, "SIFOVERLAY_USER_NAMESPACES", defaults.user_namespaces),
        apparmor_unconfined=_flag(env, "SIFOVERLAY_APPARMOR_UNCONFINED", defaults.apparmor_unconfined),
        allow_kernel_mounts=_flag(env, "SIFOVERLAY_ALLOW_KERNEL_MOUNTS", defaults.allow_kernel_mounts),
        operator_image=env.get("SIFOVERLAY_OPERATOR_IMAGE") or defaults.operator_image,
        admin=pol.from_json(env.get("SIFOVERLAY_POLICY", "")),
    )
    return OperatorConfig(
        lease_namespace=env.get("SIFOVERLAY_LEASE_NAMESPACE") or env.get("POD_NAMESPACE") or "default",
        volume_roots=parse_volume_roots(env.get("SIFOVERLAY_VOLUME_ROOTS", "")),
        journal_dir=env.get("SIFOVERLAY_JOURNAL_DIR") or None,
        state_dir=env.get("SIFOVERLAY_STATE_DIR") or None,
        lease_retry_seconds=_number(env, "SIFOVERLAY_LEASE_RETRY_SECONDS", 10.0),
        recheck_seconds=_number(env, "SIFOVERLAY_RECHECK_SECONDS", 30.0),
        drift_seconds=_number(env, "SIFOVERLAY_DRIFT_SECONDS", 300.0),
        metrics_port=int(_number(env, "SIFOVERLAY_METRICS_PORT", METRICS_PORT)),
        metrics_addr=env.get("SIFOVERLAY_METRICS_ADDR") or "0.0.0.0",
        pod_policy=policy,
        min_free_bytes=int(_number(env, "SIFOVERLAY_MIN_FREE_BYTES", 0)),
    )
