"""Which Pod Security Standards level each piece needs, checked on what the operator and
the chart actually produce (docs/kubernetes.md, "Pod Security").

`violations` applies the controls of the published Pod Security Standards (baseline and
restricted, Kubernetes 1.30+) that these pods can touch; a pod's level is the lowest
whose controls it passes. No Pod Security admission runs here (kmock runs no admission):
a real cluster's `pod-security.kubernetes.io/enforce` label is what enforces it, and the
user-namespace relaxation of the restricted runAsNonRoot checks (feature
UserNamespacesPodSecurityStandards) is not modelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sifoverlay.k8s import builders
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.builders import PodPolicy
from sifoverlay.k8s.policy import AdminPolicy, VolumeRule
from tests.k8s.test_k8s_chart import FULL_VALUES, render

pytestmark = pytest.mark.k8s
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
ADMIN = AdminPolicy(image_volumes=(VolumeRule("images", "hostPath", "/data/images"),
                                   VolumeRule("data", "persistentVolumeClaim", "data")))


def violations(pod: dict[str, Any]) -> dict[str, set[str]]:
    """{"baseline": {...}, "restricted": {...}}: the controls `pod` (a PodSpec) fails."""
    base: set[str] = set()
    strict: set[str] = set()
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            base.add(f"host namespaces ({key})")
    for volume in pod.get("volumes") or []:
        kind = next(k for k in volume if k != "name")
        if kind == "hostPath":
            base.add(f"hostPath volume {volume['name']}")
        if kind not in RESTRICTED_VOLUMES:
            strict.add(f"volume type {kind}")
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            base.add("privileged container")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPS:
            base.add(f"capabilities {sorted(added - BASELINE_CAPS)}")
        apparmor = (sc.get("appArmorProfile") or psc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            base.add(f"AppArmor {apparmor}")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            base.add("seccomp Unconfined")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            base.add("host ports")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            strict.add("seccomp profile not set")
        if sc.get("allowPrivilegeEscalation") is not False:
            strict.add("allowPrivilegeEscalation not false")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            strict.add("runAsNonRoot not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            strict.add("runAsUser 0")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            strict.add("capabilities not dropping ALL")
        if added - {"NET_BIND_SERVICE"}:
            strict.add(f"capabilities added {sorted(added - {'NET_BIND_SERVICE'})}")
    return {"baseline": base, "restricted": base | strict}


def level(pod: dict[str, Any]) -> str:
    found = violations(pod)
    return "restricted" if not found["restricted"] else "baseline" if not found["baseline"] else "privileged"


def overlayjob(image: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": wk.API_VERSION, "kind": wk.KIND,
            "metadata": {"name": "train", "namespace": "team-a", "uid": "0123456789abcdef"},
            "spec": {"image": image, "workload": {"command": ["run"], "runAsUser": 1000, "runAsGroup": 1000}}}


HOSTPATH = {"hostPath": {"path": "/data/images"}, "path": "ml/app.sif"}
PVC = {"persistentVolumeClaim": {"claimName": "data"}, "path": "ml/app.sif"}


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"])


@pytest.mark.parametrize("image, policy, why", [
    (HOSTPATH, PodPolicy(admin=ADMIN),
     {"capabilities ['SYS_ADMIN']", "AppArmor Unconfined", "hostPath volume image"}),
    (PVC, PodPolicy(admin=ADMIN), {"capabilities ['SYS_ADMIN']", "AppArmor Unconfined"}),
    # the least a FUSE mount can need: a PVC image, user namespaces, the runtime's AppArmor
    # profile (where it allows mount): SYS_ADMIN alone keeps the pod privileged
    (PVC, PodPolicy(admin=ADMIN, user_namespaces=True, apparmor_unconfined=False), {"capabilities ['SYS_ADMIN']"}),
    (HOSTPATH, PodPolicy(admin=ADMIN, fuse_access="hostPath"),
     {"capabilities ['SYS_ADMIN']", "AppArmor Unconfined", "hostPath volume image", "hostPath volume fuse"}),
    (HOSTPATH, PodPolicy(admin=ADMIN, fuse_access="privileged"), {"privileged container", "hostPath volume image"}),
])
def test_workload_pods_need_privileged_and_exactly_why(image: dict[str, Any], policy: PodPolicy, why: set[str]) -> None:
    pod = pod_of(builders.workload_job(overlayjob(image), policy=policy))
    assert level(pod) == "privileged" and violations(pod)["baseline"] == why


def test_reconcile_job_pods_are_baseline_and_miss_restricted_only_by_running_as_root() -> None:
    pod = pod_of(builders.reconcile_job(overlayjob(PVC), policy=PodPolicy(admin=ADMIN)))
    assert level(pod) == "baseline" and violations(pod)["restricted"] == {"runAsNonRoot not true"}


@pytest.mark.parametrize("volumes, expected, extra", [
    (FULL_VALUES["operator"]["imageVolumes"], "privileged", {"hostPath volume image-data"}),
    ([{"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch"}}], "baseline", set()),
])
def test_the_operator_pod_is_baseline_unless_it_mounts_a_host_path(tmp_path: Path, volumes: list[dict[str, Any]],
                                                                   expected: str, extra: set[str]) -> None:
    values = {**FULL_VALUES, "operator": {**FULL_VALUES["operator"], "imageVolumes": volumes}}
    [deployment] = [d for d in render(tmp_path, values) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert level(pod) == expected and violations(pod)["baseline"] == extra
    assert violations(pod)["restricted"] - extra - {"volume type hostPath"} == {"runAsNonRoot not true", "runAsUser 0",
                                                                                "capabilities added ['DAC_OVERRIDE', 'FOWNER']"}
