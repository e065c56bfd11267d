"""recover: outcomes per journal state, refusal to overwrite foreign changes, busy images,
void entries, and verbs that recover before they work."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine import lease
from sifoverlay.engine.journal import Journal, Kind, image_key
from sifoverlay.errors import RecoveryNeeded
from sifoverlay.fsio import CountingIO, SimulatedCrash
from sifoverlay.crashsim import open_fds
from tests.crash.harness import close_leaked_fds


class RecordingIO(CountingIO):
    """CountingIO whose log also names the file behind every fd."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(crash_at, mode="raise", keep_log=True, name_fds=True)


def kill_writer(image: Path) -> None:
    """What a dead writer leaves that only expiry clears: its lease records (in the state
    directory, keyed by the image's identity: engine/statedir.py)."""
    record = Path(lease.lease_path(image))
    if record.parent.is_dir():
        for leftover in record.parent.glob(record.name + "*"):
            leftover.unlink()
from tests.engine.conftest import assert_consistent, modify_overlay, region, sha256_range

Pred = Callable[[str, dict[str, object]], bool]


def _crash_sync_at(image: Path, journal_dir: Path, pred: Pred) -> None:
    """Run sync on a copy to find the first op matching `pred`, then crash the real sync
    right before it (in-process), leaving what a killed writer leaves."""
    probe = image.parent.parent / "probe"
    shutil.copytree(image.parent, probe)
    shutil.copytree(journal_dir, probe / "journal") if journal_dir.exists() else None
    rec = RecordingIO()
    engine.sync(probe / image.name, journal_dir=probe / "journal", io=rec)
    index = next(i for i, (op, info) in enumerate(rec.log, 1) if pred(op, info))
    shutil.rmtree(probe)
    fds = open_fds()
    with pytest.raises(SimulatedCrash):
        engine.sync(image, journal_dir=journal_dir, io=CountingIO(index))
    close_leaked_fds(fds, image.parent)
    kill_writer(image)


def _is_image(info: dict[str, object]) -> bool:
    return str(info.get("path", "")).endswith("image.sif")


def test_recover_with_nothing_pending(overlay_image: Path, journal_dir: Path) -> None:
    assert engine.recover(journal_dir=journal_dir) == []
    [outcome] = engine.recover([str(overlay_image)], journal_dir=journal_dir)
    assert (outcome.outcome, outcome.image) == ("nothing", str(overlay_image))


def test_intent_only_rolls_back_to_the_exact_old_bytes(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    before = overlay_image.read_bytes()
    # crash at the second appended blob: INTENT durable, one blob written past the end
    writes = []
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "pwrite" and _is_image(info)
                   and writes.append(1) is None and len(writes) == 2)
    assert overlay_image.stat().st_size > len(before)
    [entry] = Journal(journal_dir).pending(overlay_image)
    assert entry.state == Kind.INTENT
    assert engine.status(overlay_image).journal_pending == 1
    [outcome] = engine.recover([str(overlay_image)], journal_dir=journal_dir)
    assert (outcome.outcome, outcome.op) == ("rolled-back", "sync")
    assert overlay_image.read_bytes() == before
    assert Journal(journal_dir).pending() == []


def test_blobs_durable_rolls_forward(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    offset, size = region(overlay_image)
    # crash right at the commit write (offset 0 of the image)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "pwrite" and _is_image(info) and info["offset"] == 0)
    assert Journal(journal_dir).pending()[0].state == Kind.BLOBS_DURABLE
    [outcome] = engine.recover(journal_dir=journal_dir)
    assert outcome.outcome == "rolled-forward"
    assert_consistent(overlay_image)
    with engine_image(overlay_image) as img:
        assert img.overlay.recorded_digest == sha256_range(overlay_image, offset, size)


def engine_image(path: Path):  # type: ignore[no-untyped-def]
    from sifoverlay.ocisif import open_image

    return open_image(path)


def test_committed_finishes_garbage_collection(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "punch_hole")
    assert Journal(journal_dir).pending()[0].state == Kind.COMMITTED
    [outcome] = engine.recover([str(overlay_image)], journal_dir=journal_dir)
    assert outcome.outcome == "completed"
    assert_consistent(overlay_image)


def test_foreign_change_is_never_overwritten(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "truncate" and _is_image(info))
    with open(overlay_image, "r+b") as f:  # someone else rewrote the header meanwhile
        f.seek(72)
        f.write((12345).to_bytes(8, "little", signed=True))
    changed = overlay_image.read_bytes()
    [outcome] = engine.recover([str(overlay_image)], journal_dir=journal_dir)
    assert outcome.outcome == "failed" and "changed by someone else" in outcome.detail
    assert overlay_image.read_bytes() == changed
    assert len(Journal(journal_dir).pending()) == 1  # kept for a human
    with pytest.raises(RecoveryNeeded, match="cannot be recovered"):
        engine.sync(overlay_image, force_hash=True)


def test_sync_recovers_a_pending_entry_first(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "fsync" and _is_image(info))
    assert Journal(journal_dir).pending()
    result = engine.sync(overlay_image)
    assert result.action == "reconciled"
    assert Journal(journal_dir).pending() == []
    assert_consistent(overlay_image)


def test_recover_refuses_while_a_live_writer_holds_the_lease(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "truncate" and _is_image(info))
    held = lease.acquire(overlay_image, lease.Holder.current("job-9", "slurm"))
    try:
        [outcome] = engine.recover([str(overlay_image)], journal_dir=journal_dir)
        assert outcome.outcome == "failed" and "job-9" in outcome.detail
        assert len(Journal(journal_dir).pending()) == 1
    finally:
        held.release()
    assert engine.recover([str(overlay_image)], journal_dir=journal_dir)[0].outcome == "rolled-back"


def test_void_entry_of_a_dead_writer_is_removed(overlay_image: Path, journal_dir: Path) -> None:
    journal_dir.mkdir(exist_ok=True)
    from sifoverlay.engine.recover import _host  # a writer of THIS host: judged by its pid

    torn = journal_dir / f"{image_key(overlay_image)}.1-{_host()}-999999-abcdef.sovj"
    torn.write_bytes(b"SOVJ\x01\x00\x01\x00\xff\xff")
    before = overlay_image.read_bytes()
    [outcome] = engine.recover(journal_dir=journal_dir)
    assert outcome.outcome == "nothing" and "void" in outcome.detail
    assert not torn.exists() and overlay_image.read_bytes() == before


def test_recover_reports_a_missing_image(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    _crash_sync_at(overlay_image, journal_dir, lambda op, info: op == "truncate" and _is_image(info))
    moved = tmp_path / "moved.sif"
    os.rename(overlay_image, moved)
    [outcome] = engine.recover(journal_dir=journal_dir)
    assert outcome.outcome == "failed" and "not found" in outcome.detail
    assert len(Journal(journal_dir).pending()) == 1


class _FailingIO(CountingIO):
    """Real I/O that fails with ENOSPC at one chosen operation (a full disk)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(None)
        self.fail_at = fail_at

    def _before(self, op: str, **info: object) -> None:
        super()._before(op, **info)
        if self.count == self.fail_at:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def test_io_error_mid_commit_is_undone_at_once(overlay_image: Path, journal_dir: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    before = overlay_image.read_bytes()
    rec = RecordingIO()
    probe = tmp_path / "probe"
    shutil.copytree(overlay_image.parent, probe)
    engine.sync(probe / overlay_image.name, journal_dir=tmp_path / "probe-journal", io=rec)
    second_blob = [i for i, (op, info) in enumerate(rec.log, 1) if op == "pwrite" and _is_image(info)][1]
    with pytest.raises(OSError, match="No space left"):
        engine.sync(overlay_image, io=_FailingIO(second_blob))
    assert overlay_image.read_bytes() == before  # rolled back before the error surfaced
    assert Journal(journal_dir).pending() == []
    assert lease.inspect(overlay_image) is None
    assert engine.sync(overlay_image).action == "reconciled"
