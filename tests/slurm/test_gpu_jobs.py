"""GPUs in real Slurm jobs (issue 14): a node offering four GPUs (GRES gpu, gres.conf
File=/dev/nvidia[0-3]: fake NVIDIA character devices, major 195, made here when the host
has none), a job given two of them sees only those two /dev/nvidiaN (plus nvidiactl) in
the image, and CUDA_VISIBLE_DEVICES counts them from 0 as CUDA inside will."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifoverlay.runtime import gpu
from tests.slurm.conftest import DEV_CLUSTER, Cluster, User, sh

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

GPUS = 4
INSIDE = ("ls /dev | grep nvidia | tr '\\n' ' '; echo; "
          "echo \"cvd=$CUDA_VISIBLE_DEVICES job=${SLURM_JOB_GPUS-unset} step=${SLURM_STEP_GPUS-unset}\"")


@pytest.fixture(scope="module")
def gpu_node(cluster: Cluster) -> Iterator[Cluster]:
    """The dev cluster's node with GRES gpu:4 on /dev/nvidia0..3 (fake nodes unless the host
    has real ones), and afterwards the plain node again, the fake nodes removed."""
    made: list[str] = []
    real = gpu.host_gpus()
    if not real:
        for name, minor in [*((f"nvidia{m}", m) for m in range(GPUS)), ("nvidiactl", 255)]:
            path = f"/dev/{name}"
            if not os.path.exists(path):
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(gpu.NVIDIA_MAJOR, minor))
                made.append(path)
    elif len(real) < GPUS or not os.path.exists("/dev/nvidiactl"):
        pytest.fail(f"this host has {len(real)} NVIDIA GPUs: the test needs none (fakes) or {GPUS}+")
    try:
        up = sh(str(DEV_CLUSTER), "up", check=False, timeout=600, env={**os.environ, "DEV_CLUSTER_GPUS": str(GPUS)})
        assert up.returncode == 0, up.stderr[-2000:]
        node = sh("scontrol", "show", "node", cluster.host).stdout
        assert f"Gres=gpu:{GPUS}" in node, node
        yield cluster
    finally:
        down = sh(str(DEV_CLUSTER), "up", check=False, timeout=600)
        for path in made:
            os.unlink(path)
        assert down.returncode == 0, down.stderr[-2000:]


def test_job_sees_only_its_gpus(gpu_node: Cluster, slurm_users: tuple[User, User], make_image,  # type: ignore[no-untyped-def]
                                image_dir: Path) -> None:
    cluster = gpu_node
    alice = slurm_users[0]
    image = make_image(alice)
    out = image_dir / "out"
    out.mkdir()
    os.chown(out, alice.uid, alice.gid)
    # a job without an image holds GPU 0 until told to end, so the next ones get 1 and 2
    # (neither 0 nor 3); it ends by itself (a cancelled batch job could leave the node busy)
    release = out / "release"
    holder = cluster.sbatch(alice, "--gres=gpu:1", "-o", "/dev/null", "--wrap",
                            f"while [ ! -e {release} ]; do sleep 0.2; done")
    try:
        assert cluster.wait_state(holder, {"RUNNING"}) == "RUNNING"
        held = sh("scontrol", "show", "job", "-d", str(holder)).stdout
        assert "gpu:1(IDX:0)" in held, held
        # an srun job: its step has SLURM_STEP_GPUS, and CUDA_VISIBLE_DEVICES as Slurm sets it
        # without a device cgroup (TaskPlugin=task/none): the global ids 1,2
        done = cluster.as_user(alice, "srun", "--gres=gpu:2", f"--oci-sif-overlay={image}:ro", "sh", "-c", INSIDE,
                               cwd="/tmp")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "nvidia1 nvidia2 nvidiactl \ncvd=0,1 job=unset step=1,2\n", done.stderr
        # a batch job: the batch step has SLURM_JOB_GPUS only
        job = cluster.sbatch(alice, "--gres=gpu:2", f"--oci-sif-overlay={image}:ro", "-o", f"{out}/%j.out",
                             "-e", f"{out}/%j.err", "--wrap", INSIDE)
        assert cluster.wait_finished(job) == "COMPLETED", (out / f"{job}.err").read_text()
        assert (out / f"{job}.out").read_text() == "nvidia1 nvidia2 nvidiactl \ncvd=0,1 job=1,2 step=unset\n", \
            (out / f"{job}.err").read_text()
        # the host's own /dev is untouched, and outside the image the job sees all four
        assert sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")) == [
            "nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl"]
        plain = cluster.as_user(alice, "srun", "--gres=gpu:2", "sh", "-c", INSIDE, cwd="/tmp")
        assert (plain.returncode, plain.stdout) == (
            0, "nvidia0 nvidia1 nvidia2 nvidia3 nvidiactl \ncvd=1,2 job=unset step=1,2\n"), plain.stderr
    finally:
        release.touch()
        assert cluster.wait_finished(holder) == "COMPLETED"
