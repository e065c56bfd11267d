"""The workload pod's command, run for real (outside Kubernetes): the user's command gets
the resource's uid/gid, no capabilities and no_new_privs.

The operator builds the pod (builders.workload_job); its one container runs the runner
image's `sifoverlay exec ... --user=UID:GID IMAGE -- CMD` as root in the container. Here
that exact argv (the pod's paths mapped onto a scratch directory: the image volume's
mount, the journal on it, the work emptyDir as --base-dir) runs as root on a real
busybox OCI-SIF, and the command reports what it runs as. What only a real cluster adds:
the container's seccomp RuntimeDefault profile and the capability bounding set the
runtime applies (docs/kubernetes.md, Pod Security).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay.k8s import builders
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.builders import PodPolicy
from sifoverlay.k8s.policy import AdminPolicy, IdRange, VolumeRule
from tests.runtime.conftest import (  # noqa: F401  (fixtures)
    Env,
    env,
    fuse_for_users,
    golden_image,
    rootfs_tree,
    scratch,
    user,
)

pytestmark = pytest.mark.k8s
PROBE = ("id -u; id -g; id -G; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; "
         "echo made-by-the-job > /tmp/result")


def pod_argv(env: Env) -> list[str]:
    """The workload container's command for an OverlayJob on `env.image`, paths mapped."""
    policy = PodPolicy(admin=AdminPolicy(
        image_volumes=(VolumeRule("images", "hostPath", "/data/images"),),
        run_as_user=IdRange(1, 65534), run_as_group=IdRange(1, 65534)))
    body = {"apiVersion": wk.API_VERSION, "kind": wk.KIND,
            "metadata": {"name": "probe", "namespace": "team-a", "uid": "0123456789abcdef"},
            "spec": {"image": {"hostPath": {"path": "/data/images"}, "path": "img.oci.sif"},
                     "workload": {"command": ["sh", "-c", PROBE], "runAsUser": env.user.uid,
                                  "runAsGroup": env.user.gid}}}
    [container] = builders.workload_job(body, policy=policy)["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mapped = {f"{wk.IMAGE_MOUNT_PATH}/img.oci.sif": str(env.image),
              builders.volume_journal(): str(env.journal)}
    argv = [mapped.get(arg, arg) for arg in container["command"]]
    assert argv[:3] == ["sifoverlay", "exec", "--allow-root-options"]
    assert f"--user={env.user.uid}:{env.user.gid}" in argv and str(env.image) in argv
    # the pod's work emptyDir (wk.WORK_MOUNT_PATH) is exec's base directory there
    return [sys.executable, "-m", "sifoverlay", "exec", "--allow-root-options", "--base-dir", str(env.base), *argv[3:]]


def test_the_pods_command_runs_the_users_command_as_its_uid_without_capabilities(env: Env) -> None:
    result = subprocess.run(pod_argv(env), capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [str(env.user.uid), str(env.user.gid), str(env.user.gid)]  # no supplementary groups kept
    caps = dict(line.split(":\t") for line in lines[3:])
    assert {k: caps[k] for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapAmb"), "0000000000000000")
    assert caps["NoNewPrivs"] == "1"
    # the job's change landed in the overlay and was reconciled at exit by the runner
    again = env.exec(str(env.image), "--", "cat", "/tmp/result")
    assert (again.returncode, again.stdout) == (0, "made-by-the-job\n"), again.stderr
