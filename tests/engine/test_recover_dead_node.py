"""Journals beside leases (issue 13): an interrupted commit of a writer on ANOTHER node
(other host name, other boot_id) is finished or rolled back by this node, from the
shared journal, after taking the lease, and only once that node's lease is stale by its
heartbeat (expiry + grace) - never by its pid, which on a shared pid space is some live
process of ours."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sifoverlay import engine
from sifoverlay.engine import lease
from sifoverlay.engine.journal import Journal, Kind, image_key
from sifoverlay.engine.leasefile import read_info, replace_record
from tests.engine.conftest import assert_consistent, modify_overlay, region, sha256_range
from tests.engine.test_engine_recover import _crash_sync_at, _is_image, engine_image

DEAD_HOST = "n-dead"
DEAD_BOOT = "0badb007-0000-4000-8000-000000000000"


def _as_dead_node(image: Path, journal_dir: Path, *, expired_ago: float, grace: float) -> None:
    """Make the interrupted writer look like one of node n-dead: its journal entry's op id
    names that host, and it still holds the writer lease with n-dead's boot_id and a live
    pid of this machine (ours), expired `expired_ago` seconds ago with `grace`."""
    journal = Journal(journal_dir)
    [entry] = journal.pending(image)
    ms, _host, _pid, rand = entry.op_id.split("-")
    os.rename(entry.path, journal.entry_path(entry.key, f"{ms}-n_dead-{os.getpid()}-{rand}"))
    held = lease.acquire(image, lease.Holder.current("job-dead", "slurm"), ttl=60, region=(0, 0))
    held.unlock_range()
    now = time.time()
    replace_record(held.file_path, dict(held.info.record, host=DEAD_HOST, boot_id=DEAD_BOOT,
                                        heartbeat=now - expired_ago - 60, expires=now - expired_ago, grace=grace))


def test_dead_nodes_commit_is_rolled_forward_here(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    offset, size = region(overlay_image)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "pwrite" and _is_image(info) and info["offset"] == 0)
    _as_dead_node(overlay_image, journal_dir, expired_ago=30, grace=10)
    [entry] = Journal(journal_dir).pending(overlay_image)
    assert entry.state == Kind.BLOBS_DURABLE and "-n_dead-" in entry.op_id
    [outcome] = engine.recover(journal_dir=journal_dir, grace=10)
    assert outcome.outcome == "rolled-forward"
    assert_consistent(overlay_image)
    with engine_image(overlay_image) as img:
        assert img.overlay.recorded_digest == sha256_range(overlay_image, offset, size)
    assert Journal(journal_dir).pending() == []
    assert lease.inspect(overlay_image) is None  # the dead node's lease broken, ours released


def test_dead_nodes_intent_is_rolled_back_here(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    before = overlay_image.read_bytes()
    writes: list[int] = []
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "pwrite" and _is_image(info)
                   and writes.append(1) is None and len(writes) == 2)
    _as_dead_node(overlay_image, journal_dir, expired_ago=30, grace=10)
    [outcome] = engine.recover([str(overlay_image)], journal_dir=journal_dir, grace=10)
    assert (outcome.outcome, outcome.op) == ("rolled-back", "sync")
    assert overlay_image.read_bytes() == before


def test_a_node_within_its_grace_is_not_touched(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    """Expired but within the grace the record announces (20 s > the caller's 10 s): the
    node may only be frozen or cut off; recovery waits, nothing is changed."""
    modify_overlay(overlay_image, tmp_path)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "pwrite" and _is_image(info) and info["offset"] == 0)
    _as_dead_node(overlay_image, journal_dir, expired_ago=15, grace=20)
    before = overlay_image.read_bytes()
    [outcome] = engine.recover(journal_dir=journal_dir, grace=10)
    assert outcome.outcome == "failed" and "job job-dead" in outcome.detail and DEAD_HOST in outcome.detail
    assert overlay_image.read_bytes() == before and len(Journal(journal_dir).pending()) == 1
    info = read_info(lease.lease_path(overlay_image))
    assert info is not None and info.host == DEAD_HOST  # not broken


def test_fresh_torn_intent_of_another_node_is_kept(overlay_image: Path, journal_dir: Path) -> None:
    """A void entry named by another host: its pid says nothing here; kept while young
    (that node may be writing it now), not judged by pid like one of this host."""
    journal_dir.mkdir(exist_ok=True)
    torn = journal_dir / f"{image_key(overlay_image)}.1-n_other-{os.getpid() + 10**6}-abcdef.sovj"
    torn.write_bytes(b"SOVJ\x01\x00\x01\x00\xff\xff")
    assert engine.recover(journal_dir=journal_dir) == []
    assert torn.exists()
    old = time.time() - 10_000
    os.utime(torn, (old, old))
    [outcome] = engine.recover(journal_dir=journal_dir)
    assert outcome.outcome == "nothing" and not torn.exists()
