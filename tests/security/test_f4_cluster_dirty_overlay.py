"""Finding 4 against the real Prolog/Epilog on the dev cluster: the attacker clears the
clean bit of her own overlay before each rw job, so every Prolog replays/repairs it.
Root must never attach a loop device to the image nor run e2fsck/losetup as root; the
check runs as the job user. A watcher samples /proc and /sys/block every few ms while the
jobs run (and must see the job user's e2fsck at least once, so it really watched)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.h3_support import (
    JOB_LIMIT_MIN, assert_node_not_drained, outdir_for, overlay_offset, set_ext3_dirty, submit,
)
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)
from tests.slurm.test_jobs import assert_reconciled, srun_in

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]
JOBS = 3
WATCHED = ("e2fsck", "losetup", "fsck.ext3", "fsck.ext4", "blkid")


def _uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[2])  # effective
    except OSError:
        return None
    return None


@contextlib.contextmanager
def watching(image: Path) -> Iterator[set[tuple[str, int]]]:
    """Yields the set of (tool, effective uid) seen, plus ("loop", 0) for a loop device
    backed by `image`; filled until the block ends."""
    st = os.stat(image)
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as fh:
                        comm = fh.read().strip()
                except OSError:
                    continue
                if comm in WATCHED:
                    uid = _uid(pid)
                    if uid is not None:
                        seen.add((comm, uid))
            for name in os.listdir("/sys/block"):
                if name.startswith("loop"):
                    try:
                        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
                        other = os.stat(backing)
                    except OSError:
                        continue
                    if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                        seen.add(("loop", 0))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        yield seen
    finally:
        stop.set()
        worker.join(timeout=10)


def test_dirty_overlay_is_checked_by_the_job_user_never_root(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    alice, _ = slurm_users
    outdir = outdir_for(image_dir)
    image = make_image(alice)
    offset = overlay_offset(image)
    jobs = []
    with watching(image) as seen:
        for _ in range(JOBS):
            fd = os.open(image, os.O_RDWR)
            try:
                set_ext3_dirty(fd, offset)  # what alice can do to her own image between jobs
            finally:
                os.close(fd)
            job = submit(cluster, alice, image, outdir, command="echo $SLURM_JOB_ID >> /jobs.txt")
            assert job is not None
            state = cluster.wait_finished(job, timeout=JOB_LIMIT_MIN * 60 + 60)
            out = outdir / f"{job}.out"
            assert state == "COMPLETED", (state, out.read_text() if out.exists() else "")
            jobs.append(job)
    assert ("loop", 0) not in seen, f"a loop device was attached to the user's image: {seen}"
    assert not [s for s in seen if s[1] == 0], f"root ran {sorted(s for s in seen if s[1] == 0)}"
    assert not [s for s in seen if s[0] == "losetup"], seen
    assert ("e2fsck", alice.uid) in seen, f"the watcher saw no e2fsck at all: {seen}"
    assert_node_not_drained(cluster)
    assert_reconciled(cluster, image, jobs[-1])
    done = srun_in(cluster, alice, image, "cat", "/jobs.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(j) for j in jobs]
