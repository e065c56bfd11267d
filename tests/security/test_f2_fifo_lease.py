"""Finding 2: root hangs on a FIFO.

The attacker plants FIFOs where root used to read lease records (``.<img>.sifoverlay-
lease`` and ``….r.<token>`` beside her image) and swaps her image's name with a symlink
to a FIFO (renameat2 RENAME_EXCHANGE in a loop, from outside) while her jobs start and
end. Root opened those without O_NONBLOCK and without a regular-file check: the Prolog,
Epilog and sweeper blocked forever (a killed Prolog left a 365-day lease behind).

Now lease records live in the root state directory and every file root opens is opened
O_NOFOLLOW|O_NONBLOCK and must be a regular file. Every job ends within its time limit,
no Prolog/Epilog is left running, the node never drains, a sweeper pass ends in bounded
time, the victim's image is unchanged and the victim's next rw job runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.security.h3_support import (
    assert_node_not_drained, flipping, outdir_for, snapshot, submit, sweep, user_dir, victim_rw_job_runs, wait_all,
)
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

JOBS = 8


def _hooks_running() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "sifoverlay.slurm.(prolog|epilog)|/usr/lib/sifoverlay/(prolog|epilog)"],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_fifos_and_a_flipping_name_never_block_root(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    alice, bob = slurm_users
    outdir = outdir_for(image_dir)
    home_a = user_dir(image_dir, "alice", alice)
    home_b = user_dir(image_dir, "bob", bob)
    mine = make_image(alice, "img.sif", where=home_a)
    victim = make_image(bob, "img.sif", where=home_b)
    for name in (".img.sif.sifoverlay-lease", ".img.sif.sifoverlay-lease.r.evil", "fifo"):
        os.mkfifo(home_a / name)
        os.chown(home_a / name, alice.uid, alice.gid)
    os.symlink(home_a / "fifo", home_a / "link.sif")
    os.lchown(home_a / "link.sif", alice.uid, alice.gid)
    before = snapshot(victim)
    jobs: list[int] = []
    start = time.monotonic()
    with flipping(alice, mine, home_a / "link.sif"):
        for _ in range(JOBS):
            job = submit(cluster, alice, mine, outdir, command="sleep 0.3")
            if job is not None:
                jobs.append(job)
            time.sleep(0.3)
        wait_all(cluster, jobs)  # each within its limit: nothing blocked
        swept = sweep(cluster, timeout=120)  # a sweeper pass while the name still flips
        assert swept.returncode in (0, 1), swept.stderr
    assert jobs, "no job could even be submitted"
    deadline = time.monotonic() + 30
    while _hooks_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _hooks_running(), f"Prolog/Epilog still running: {_hooks_running()}"
    assert time.monotonic() - start < JOBS * 150
    assert snapshot(victim) == before
    assert_node_not_drained(cluster)
    victim_rw_job_runs(cluster, bob, victim, outdir)


def test_fifos_where_records_are_read_never_block_a_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even in the state directory (which no user can write), a FIFO under a record name is
    skipped at once: O_NONBLOCK + S_ISREG on every record read."""
    import signal

    from sifoverlay.engine import lease

    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))
    image = tmp_path / "img.sif"
    image.write_bytes(b"\0" * (1 << 20))
    target = Path(lease.lease_path(image))
    target.parent.mkdir(parents=True)
    os.mkfifo(f"{target}.r.evil")
    signal.alarm(20)  # a blocking open would hang here: fail loudly instead
    try:
        assert lease.readers(image) == []
        with lease.acquire(image, lease.Holder.current("1", "test"), ttl=60, region=(0, 0)) as held:
            assert held.file_path == str(target)
        os.mkfifo(target)
        assert lease.inspect(image) is None
    finally:
        signal.alarm(0)
