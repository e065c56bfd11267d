"""MPI inside an image (issue 14): Debian's OpenMPI (PMIx client) and an MPI hello world,
copied with their ldd closure into a busybox image; `srun --mpi=pmix -n 3` runs the three
ranks inside it, reaching the step's PMIx server (slurmstepd) over TCP and its shared
memory store through the directory the plugin binds on /.sifoverlay/pmix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.runtime import images
from tests.slurm.conftest import Cluster, User, sh

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

CAPTURE = "/tmp/sifoverlay-H14-mpi-output.txt"


@pytest.fixture(scope="session")
def mpi_image_base(imported_image: Path) -> Path:
    require_tool("mpicc.openmpi", "ldd")  # the OpenMPI wrapper itself: `mpicc` is an alternative
    return images.mpi_hello_image(imported_image, imported_image.parent / "mpi-openmpi", "openmpi")


def test_mpi_hello_world_with_three_ranks_in_the_image(cluster: Cluster, slurm_users: tuple[User, User],
                                                       mpi_image_base: Path, image_dir: Path) -> None:
    alice = slurm_users[0]
    image = image_dir / "mpi.oci.sif"
    sh("cp", "--sparse=always", str(mpi_image_base), str(image))
    image.chmod(0o644)
    done = cluster.as_user(alice, "srun", "--mpi=pmix", "-O", "-n", "3", f"--oci-sif-overlay={image}:ro",
                           "/usr/local/bin/mpi-hello", cwd="/tmp", timeout=180)
    cluster.settle(cancel=False)
    Path(CAPTURE).write_text(f"srun --mpi=pmix -O -n 3 --oci-sif-overlay=IMAGE:ro /usr/local/bin/mpi-hello\n"
                             f"{done.stdout}{done.stderr}")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"rank {r} of 3 on {cluster.host}" for r in range(3)]
    assert "PMIX ERROR" not in done.stderr, done.stderr  # the shared-memory store was reachable
    # the host has no such binary: the ranks really ran inside the image
    assert not os.path.exists("/usr/local/bin/mpi-hello")
    assert subprocess.run(["test", "-e", "/usr/local/bin/mpi-hello"]).returncode == 1
