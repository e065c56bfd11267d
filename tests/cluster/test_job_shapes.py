"""Job shapes (docs/slurm.md "Job shapes"): by default the batch script runs inside the
image like every step; with --oci-sif-batch=host (OCI_SIF_BATCH=host) it runs on the host
and can call srun, and every srun step still runs in the job's image, on every node (the
pyxis shape, and the one for multi-node MPI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.conftest import NODES, Bed, User

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.slow]

OS_RELEASE = 'ID=sifo-bed\nPRETTY_NAME="sifoverlay test bed image"\n'
JOB = """#!/bin/sh
srun hostname
srun cat /etc/os-release
if command -v srun >/dev/null && [ -e /usr/lib/sifoverlay ]; then echo "batch script on the host $(hostname)"; fi
"""


@pytest.fixture
def image_with_os_release(bed: Bed, bed_users: tuple[User, User], bed_image, bed_out: Path) -> Path:
    """An image whose overlay carries its own /etc/os-release (the busybox base has none)."""
    image = bed_image(bed_users[0])
    # as root: /etc of the image is root's (a job of the owner cannot create files there)
    done = bed.run("srun", "-N1", f"--chdir={bed_out}", f"--oci-sif-overlay={image}:rw", "sh", "-c",
                   f"printf '{OS_RELEASE.replace(chr(10), chr(92) + 'n')}' > /etc/os-release")
    assert done.returncode == 0, done.stderr
    return image


@pytest.mark.parametrize("how", ["option", "env"])
def test_batch_on_host_steps_in_the_image_on_three_nodes(bed: Bed, bed_users: tuple[User, User],
                                                          image_with_os_release: Path, bed_out: Path,
                                                          how: str) -> None:
    alice = bed_users[0]
    script = bed_out / "job.sh"
    script.write_text(JOB)
    script.chmod(0o755)
    shape = ["--oci-sif-batch=host"] if how == "option" else []
    env = {"OCI_SIF_BATCH": "host"} if how == "env" else None
    job = bed.sbatch(alice, "-N3", f"--oci-sif-overlay={image_with_os_release}:ro", *shape,
                     "-o", str(bed_out / "%j.out"), str(script), env=env, cwd=str(bed_out))
    assert bed.wait_finished(job) == "COMPLETED"
    out = (bed_out / f"{job}.out").read_text().splitlines()
    assert sorted(line for line in out if line in NODES) == list(NODES)
    assert out.count("ID=sifo-bed") == 3
    assert out.count('PRETTY_NAME="sifoverlay test bed image"') == 3
    host_line = [line for line in out if line.startswith("batch script on the host")]
    assert len(host_line) == 1 and host_line[0].split()[-1] in NODES


def test_batch_in_the_image_is_the_default(bed: Bed, bed_users: tuple[User, User], image_with_os_release: Path,
                                           bed_out: Path) -> None:
    alice = bed_users[0]
    job = bed.sbatch(alice, "-N1", f"--oci-sif-overlay={image_with_os_release}:ro", "-o",
                     str(bed_out / "%j.out"), "--wrap",
                     "cat /etc/os-release; command -v srun || echo no-srun-in-the-image", cwd=str(bed_out))
    assert bed.wait_finished(job) == "COMPLETED"
    text = (bed_out / f"{job}.out").read_text()
    assert OS_RELEASE in text and "no-srun-in-the-image" in text


def test_bad_batch_shape_is_refused(bed: Bed, bed_users: tuple[User, User], image_with_os_release: Path,
                                    bed_out: Path) -> None:
    done = bed.as_user(bed_users[0], "sbatch", f"--oci-sif-overlay={image_with_os_release}:ro",
                       "--oci-sif-batch=container", "--wrap", "true", cwd=str(bed_out))
    assert done.returncode != 0
    assert "--oci-sif-batch=container: expected image or host" in done.stderr
