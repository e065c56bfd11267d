"""Finding 7: unbounded root work.

The overlay region only had to CONTAIN the ext3, and hashing reads holes as zeros: an
owner could declare a huge sparse region around a small ext3 and cost the node hours of
root CPU in an Epilog (a timed-out Epilog drains the node).

Now: a plugstack/operator limit on the overlay size (max_overlay=, default 256 GiB) and
a region that exceeds its ext3 by more than a small slack are refused at the Prolog,
before any hashing; hashing in the Epilog has a deadline (hash_deadline=) after which the
job's session and lease are left to the sweeper, which has none.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from sifoverlay.errors import OverlayStateError
from sifoverlay.slurm.config import SlurmConfig, parse_args
from tests.security.h3_support import assert_node_not_drained, outdir_for, overlay_offset, snapshot, submit, user_dir
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)
from tests.slurm.test_epilog_metrics import (  # noqa: F401 - fixtures and helpers of the Epilog tests
    _lease_by_exited_process, _start_session, _write_with_debugfs, config, overlay_image, textdir,
)


def _shrink_ext3(image: Path, to_bytes: int) -> None:
    """Rewrite s_blocks_count so the ext3 claims only `to_bytes` of its region (the owner
    can write her image: a region far larger than the filesystem in it)."""
    offset = overlay_offset(image) + 1024
    fd = os.open(image, os.O_RDWR)
    try:
        log_block = struct.unpack("<I", os.pread(fd, 4, offset + 24))[0]
        block = 1024 << log_block
        blocks = to_bytes // block
        # s_blocks_count, s_r_blocks_count, s_free_blocks_count: a plausible smaller filesystem
        os.pwrite(fd, struct.pack("<III", blocks, 0, blocks // 2), offset + 4)  # io-seam: exempt (test)
    finally:
        os.close(fd)


@pytest.mark.slurm
@pytest.mark.root
@pytest.mark.slow
def test_oversized_sparse_region_is_refused_at_prolog_before_hashing(
    cluster: Cluster, slurm_users: tuple[User, User], imported_image: Path, image_dir: Path,
) -> None:
    from sifoverlay.engine import create_overlay

    alice, _ = slurm_users
    outdir = outdir_for(image_dir)
    home_a = user_dir(image_dir, "alice", alice)
    mine = home_a / "big.sif"
    subprocess.run(["cp", "--sparse=always", str(imported_image), str(mine)], check=True)
    create_overlay(mine, size_mib=1024, sparse=True, uid=alice.uid, gid=alice.gid,
                   journal_dir=str(image_dir / "create-journal"))
    os.chown(mine, alice.uid, alice.gid)
    _shrink_ext3(mine, 64 << 20)  # 1 GiB region, 64 MiB ext3
    before = snapshot(mine)
    start = time.monotonic()
    job = submit(cluster, alice, mine, outdir, command="true")
    assert job is not None
    state = cluster.wait_finished(job, timeout=120)
    took = time.monotonic() - start
    out = (outdir / f"{job}.out").read_text() if (outdir / f"{job}.out").exists() else ""
    assert state != "COMPLETED", out
    assert "but its ext3 is only" in out, out
    assert took < 90, f"refusal took {took:.0f} s"
    assert snapshot(mine) == before  # nothing hashed, nothing committed
    assert_node_not_drained(cluster)


def test_plugstack_limits_parse_like_the_c_plugin() -> None:
    config = parse_args(["max_overlay=64G", "hash_deadline=30", "state_dir=/srv/sifoverlay"])
    assert (config.max_overlay, config.hash_deadline, config.state_dir) == (64 << 30, 30.0, "/srv/sifoverlay")
    assert SlurmConfig().max_overlay == 256 << 30 and SlurmConfig().hash_deadline == 600.0
    for bad in ("max_overlay=0", "max_overlay=12X", "max_overlay=-1", "hash_deadline=5M", "state_dir=relative"):
        with pytest.raises(Exception, match="plugstack"):
            parse_args([bad])


def test_max_overlay_refuses_before_hashing(overlay_image: Path) -> None:
    from sifoverlay.engine.reconcile import check_overlay_bounds

    fd = os.open(overlay_image, os.O_RDONLY)
    try:
        check_overlay_bounds(str(overlay_image), fd, max_bytes=64 << 20)  # exactly the limit: fine
        with pytest.raises(OverlayStateError, match="more than the configured limit of 1048576 bytes"):
            check_overlay_bounds(str(overlay_image), fd, max_bytes=1 << 20)
    finally:
        os.close(fd)


def test_epilog_hash_deadline_leaves_the_job_to_the_sweeper(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path,
) -> None:
    """An Epilog past hash_deadline stops hashing, commits nothing and keeps the session and
    the lease (never a drained node); the sweeper (no deadline) then reconciles."""
    from dataclasses import replace

    from sifoverlay.engine import lease, sessions
    from sifoverlay.slurm.jobend import finish_job

    _lease_by_exited_process(overlay_image, "61", ttl=365 * 24 * 3600.0)
    _start_session(config, "61", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path)
    hurried = replace(config, hash_deadline=1e-9, epilog_reconcile="sync")  # async: the worker has no deadline
    before = snapshot(overlay_image)
    done = finish_job("61", hurried, reason="epilog")
    assert (done.result, done.step) == ("failed", "sync") and "deadline" in done.detail, done
    assert snapshot(overlay_image) == before
    assert sessions.load(config.journal_dir, "61") is not None
    assert lease.inspect(overlay_image) is not None and lease.inspect(overlay_image).job_id == "61"
    swept = finish_job("61", hurried, reason="sweeper")
    assert swept.result == "reconciled", swept
    assert sessions.load(config.journal_dir, "61") is None and lease.inspect(overlay_image) is None
