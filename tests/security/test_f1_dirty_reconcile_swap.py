"""Finding 1: another user's image modified by root.

The attacker leaves the ext3 of her own image dirty, so every rw Prolog reconciles it
before the job starts, and swaps her image's name with a symlink to the victim's image
(renameat2 RENAME_EXCHANGE in a loop, from outside) while her jobs start and end. The
victim's overlay is dirty too, so any root sync that reached it would replay and commit
a new digest into it. Root used to re-open the image by path for that reconcile
(`engine.sync(image)`, `SifFile.open` without O_NOFOLLOW) and committed into the victim.

Now every root step works on the authorized descriptor (engine.sync(image_fd=,
expect_identity=)); the victim's image stays byte-for-byte unchanged (sha256 and mtime),
every job ends within its limit, the node never drains, and the victim's next rw job runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.security.h3_support import (
    assert_node_not_drained, flipping, outdir_for, overlay_offset, set_ext3_dirty, snapshot, submit, sweep, user_dir,
    victim_rw_job_runs, wait_all,
)
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

JOBS = 10


def test_dirty_reconcile_never_follows_a_swapped_name(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    alice, bob = slurm_users
    outdir = outdir_for(image_dir)
    home_a = user_dir(image_dir, "alice", alice)
    home_b = user_dir(image_dir, "bob", bob)
    mine = make_image(alice, "img.sif", where=home_a)
    victim = make_image(bob, "img.sif", where=home_b)
    vfd = os.open(victim, os.O_RDWR)
    try:
        set_ext3_dirty(vfd, overlay_offset(victim))  # a root sync reaching it WOULD write it
    finally:
        os.close(vfd)
    os.symlink(victim, home_a / "link.sif")
    os.lchown(home_a / "link.sif", alice.uid, alice.gid)
    before = snapshot(victim)
    offset = overlay_offset(mine)
    fd = os.open(mine, os.O_RDWR)  # the attacker keeps her own image open: dirtied between jobs
    jobs: list[int] = []
    states: dict[int, str] = {}
    try:
        with flipping(alice, mine, home_a / "link.sif"):
            for _ in range(JOBS):
                set_ext3_dirty(fd, offset)
                job = submit(cluster, alice, mine, outdir, command="true")
                if job is not None:
                    jobs.append(job)
                    cluster.wait_state(job, {"RUNNING", "COMPLETING", *cluster_done()}, timeout=120)
                time.sleep(0.2)
            states = wait_all(cluster, jobs)
    finally:
        os.close(fd)
    print(f"F1: {len(jobs)} jobs submitted, end states {sorted(states.values())}")  # how often the race got through
    sweep(cluster)  # sessions whose Epilog refused the swapped name are finished now
    assert jobs, "no job could even be submitted"
    assert snapshot(victim) == before, "root modified the victim's image"
    assert_node_not_drained(cluster)
    victim_rw_job_runs(cluster, bob, victim, outdir)


def cluster_done() -> set[str]:
    from tests.slurm.conftest import JOB_DONE_STATES

    return set(JOB_DONE_STATES)


def test_sync_on_the_authorized_fd_never_reaches_a_swapped_in_image(
    imported_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine half of the fix, deterministically: the name is ALREADY a symlink to the
    victim when root's sync runs. On the authorized fd the attacker's own (dirty) image is
    reconciled and the victim is untouched; by path (the Epilog's expect_identity) root
    refuses; SifFile.open never follows the symlink."""
    import shutil

    from sifoverlay import engine
    from sifoverlay.engine import create_overlay
    from sifoverlay.errors import SifOverlayError
    from sifoverlay.sif.load import SifFile

    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))
    images = []
    for name in ("mine", "victim"):
        path = tmp_path / name / "img.sif"
        path.parent.mkdir()
        shutil.copyfile(imported_image, path)
        create_overlay(path, size_mib=64, sparse=True, journal_dir=str(tmp_path / "cj"))
        fd = os.open(path, os.O_RDWR)
        set_ext3_dirty(fd, overlay_offset(path))
        os.close(fd)
        images.append(path)
    mine, victim = images
    before = snapshot(victim)
    authorized = os.open(mine, os.O_RDONLY | os.O_NOFOLLOW)
    st = os.fstat(authorized)
    try:
        os.rename(mine, mine.with_name("real.sif"))
        os.symlink(victim, mine)  # the swap, done before root's sync even starts
        result = engine.sync(str(mine), image_fd=authorized, expect_identity=(st.st_dev, st.st_ino),
                             journal_dir=str(tmp_path / "j"))
        assert result.action in ("reconciled", "replayed-and-reconciled", "noop")
        with pytest.raises(SifOverlayError):
            engine.sync(str(mine), expect_identity=(st.st_dev, st.st_ino), journal_dir=str(tmp_path / "j"))
        with pytest.raises(SifOverlayError, match="symbolic link"):
            SifFile.open(str(mine))
    finally:
        os.close(authorized)
    assert snapshot(victim) == before
