"""MPI across nodes (issue 14, docs/slurm.md "MPI"): an MPI hello world with 3 ranks on the
3 nodes of the test bed, inside an image that carries its own MPI (Debian's, copied with
its ldd closure into a busybox image: tests/runtime/images.py mpi_hello_image):

  srun --mpi=pmix: OpenMPI 4.1 with its PMIx client; slurmstepd's PMIx server is reached
                   over TCP, its shared-memory store through the step's PMIx directory,
                   which the plugin binds on /.sifoverlay/pmix. The ranks pass their host
                   names round a ring (mpi-hello --ring): every rank exchanges a message
                   with a rank on another node, over the nodes' eth0 (each node is a
                   network namespace on a bridge) with no interface setting.
  srun --mpi=pmi2: MPICH 4.0, whose PMI-1 client (built into libmpich) talks to Slurm's
                   mpi/pmi2 plugin over the inherited socket PMI_FD: nothing is bound.
                   No ring here: Debian's MPICH 4.0.2 (ch4:ucx) deadlocks now and then in
                   MPI_Finalize once ranks have talked over UCX's TCP transport (one rank
                   waits in ucp_disconnect_nb for a peer that sits in the PMI barrier;
                   the same with mpiexec.mpich on one host, no Slurm, no image; fixed
                   upstream by pmodels/mpich#6596), so the MPICH run stays at MPI_Init,
                   the PMI exchange, and MPI_Finalize.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.conftest import NODES, Bed, User, sh
from tests.conftest import require_tool
from tests.runtime import images

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.slow]

CAPTURE = "/tmp/sifoverlay-M14-mpi-output.txt"
# srun --mpi=TYPE -> the image's MPI, and whether the ranks talk round a ring (see above)
FLAVOUR = {"pmix": "openmpi", "pmi2": "mpich"}
RING = {"pmix": True, "pmi2": False}


@pytest.fixture(scope="session")
def mpi_image_base(imported_image: Path) -> Callable[[str], Path]:
    """mpi_image_base(flavour) -> the MPI hello world image (built once per session)."""
    built: dict[str, Path] = {}

    def get(flavour: str) -> Path:
        if flavour not in built:
            require_tool(images.MPI_FLAVOURS[flavour][0], "ldd")
            built[flavour] = images.mpi_hello_image(imported_image, imported_image.parent / f"bed-mpi-{flavour}",
                                                    flavour)
        return built[flavour]

    return get


@pytest.fixture(scope="module")
def capture() -> Path:
    path = Path(CAPTURE)
    path.write_text("")
    return path


@pytest.mark.parametrize("mpi", ["pmix", "pmi2"])
def test_mpi_hello_world_with_three_ranks_on_three_nodes(bed: Bed, bed_users: tuple[User, User], bed_dir: Path,
                                                         mpi_image_base: Callable[[str], Path], capture: Path,
                                                         mpi: str) -> None:
    alice = bed_users[0]
    image = bed_dir / f"mpi-{FLAVOUR[mpi]}.oci.sif"
    sh("cp", "--sparse=always", str(mpi_image_base(FLAVOUR[mpi])), str(image))
    image.chmod(0o644)
    argv = ["srun", "-N3", "-n3", f"--mpi={mpi}", f"--oci-sif-overlay={image}:ro", "/usr/local/bin/mpi-hello",
            *(["--ring"] if RING[mpi] else [])]
    done = bed.as_user(alice, *argv, cwd="/tmp", timeout=240)
    with capture.open("a") as out:
        out.write(f"$ {' '.join(argv).replace(str(image), 'IMAGE')}   # image: Debian {FLAVOUR[mpi]}\n"
                  f"{done.stdout}{done.stderr}(exit {done.returncode})\n\n")
    assert done.returncode == 0, done.stderr
    # block distribution: rank r on the r-th node (with --ring: it got rank r-1's host name)
    ring = [f" (from rank {(r + 2) % 3} on {NODES[(r + 2) % 3]})" if RING[mpi] else "" for r in range(3)]
    assert sorted(done.stdout.splitlines()) == [f"rank {r} of 3 on {NODES[r]}{ring[r]}" for r in range(3)]
    assert "PMIX ERROR" not in done.stderr, done.stderr  # the shared-memory store was reachable
    # the nodes have no such binary: the ranks really ran inside the image
    for node in NODES:
        assert bed.on_node(node, "test", "-e", "/usr/local/bin/mpi-hello").returncode == 1
