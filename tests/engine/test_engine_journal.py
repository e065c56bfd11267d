"""Journal records: self-validating, torn tails ignored, default directory rules."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sifoverlay.engine import journal as jr
from sifoverlay.engine.commit import blend_of, dead_segments
from sifoverlay.engine.journal import BlobPlacement, Intent, Journal, Kind


def _intent(image: str, **kw: object) -> Intent:
    values: dict[str, object] = dict(
        op_id=jr.new_op_id(), op="sync", image=image, dev=1, ino=2, old_length=100, new_length=120,
        old_root_digest="sha256:" + "a" * 64, new_root_digest="sha256:" + "b" * 64,
        appended=(BlobPlacement(100, 20, "sha256:" + hashlib.sha256(b"x" * 20).hexdigest()),),
        freed=((50, 10),), before=b"B" * 64, after=b"A" * 64, small_blobs={"sha256:" + "c" * 64: b"{}"},
        job="42", host="h", pid=7, created=1.5, extra={"overlay_digest": "sha256:" + "d" * 64},
        key="00000000000000aa-2-0",
    )
    values.update(kw)
    return Intent(**values)  # type: ignore[arg-type]


def test_intent_round_trips_exactly() -> None:
    intent = _intent("/x/image.sif")
    assert Intent.decode(intent.encode()) == intent


def test_entry_states_follow_markers_and_finish_removes(tmp_path: Path) -> None:
    from sifoverlay.engine import statedir

    journal = Journal(tmp_path / "j")
    (tmp_path / "image.sif").write_bytes(b"x")
    (tmp_path / "other.sif").write_bytes(b"y")
    key = statedir.key_of_path(str(tmp_path / "image.sif"))
    intent = _intent(str(tmp_path / "image.sif"), key=key)
    writer = journal.begin(intent)
    assert os.path.basename(writer.path).startswith(key + ".")  # entries are named by image identity
    [entry] = journal.pending(tmp_path / "image.sif")
    os.rename(tmp_path / "image.sif", tmp_path / "renamed.sif")  # a rename keeps the image's entries
    assert [e.path for e in journal.pending(tmp_path / "renamed.sif")] == [entry.path]
    assert journal.pending(key=key)[0].path == entry.path
    assert (entry.state, entry.intent) == (Kind.INTENT, intent)
    writer.mark(Kind.BLOBS_DURABLE, intent.op_id)
    assert journal.pending()[0].state == Kind.BLOBS_DURABLE
    writer.mark(Kind.COMMITTED, intent.op_id)
    assert journal.pending()[0].state == Kind.COMMITTED
    assert journal.pending(tmp_path / "other.sif") == []
    assert journal.oldest_age() is not None
    writer.finish()
    assert journal.pending() == [] and journal.oldest_age() is None
    assert oct(os.stat(tmp_path / "j").st_mode & 0o777) == "0o700"


def test_every_torn_length_reads_as_a_valid_prefix(tmp_path: Path) -> None:
    """Cut the entry file at every byte: the state is the last complete record, a cut
    INTENT is a void entry, never an exception."""
    journal = Journal(tmp_path / "j")
    intent = _intent(str(tmp_path / "image.sif"))
    writer = journal.begin(intent)
    writer.mark(Kind.BLOBS_DURABLE, intent.op_id)
    writer.mark(Kind.COMMITTED, intent.op_id)
    writer.abandon()
    [entry] = journal.pending()
    raw = Path(entry.path).read_bytes()
    intent_len = len(jr.encode_record(Kind.INTENT, intent.encode()))
    marker_len = (len(raw) - intent_len) // 2
    for cut in range(len(raw) + 1):
        Path(entry.path).write_bytes(raw[:cut])
        [found] = journal.pending()
        if cut < intent_len:
            assert (found.intent, found.state) == (None, None)
        elif cut < intent_len + marker_len:
            assert found.state == Kind.INTENT
        elif cut < len(raw):
            assert found.state == Kind.BLOBS_DURABLE
        else:
            assert found.state == Kind.COMMITTED


def test_corrupted_byte_invalidates_the_record_and_what_follows(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    intent = _intent(str(tmp_path / "image.sif"))
    writer = journal.begin(intent)
    writer.mark(Kind.BLOBS_DURABLE, intent.op_id)
    writer.abandon()
    path = Path(journal.pending()[0].path)
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0xFF  # inside the BLOBS_DURABLE record
    path.write_bytes(bytes(raw))
    assert journal.pending()[0].state == Kind.INTENT
    raw[20] ^= 0xFF  # inside the INTENT
    path.write_bytes(bytes(raw))
    assert journal.pending()[0].intent is None


def test_append_over_a_torn_tail(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    intent = _intent(str(tmp_path / "image.sif"))
    writer = journal.begin(intent)
    writer.abandon()
    path = Path(journal.pending()[0].path)
    with open(path, "ab") as f:
        f.write(b"SOVJ\x01\x00\x02\x00garbage")
    entry = journal.pending()[0]
    assert entry.state == Kind.INTENT
    journal.append(entry, Kind.BLOBS_DURABLE)
    assert journal.pending()[0].state == Kind.BLOBS_DURABLE


def test_default_journal_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIFOVERLAY_JOURNAL_DIR", str(tmp_path / "env"))
    assert jr.default_journal_dir() == str(tmp_path / "env")
    monkeypatch.delenv("SIFOVERLAY_JOURNAL_DIR")
    monkeypatch.delenv("SIFOVERLAY_STATE_DIR", raising=False)  # the journal is <state dir>/journal
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert jr.default_journal_dir() == "/var/lib/sifoverlay/journal"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert jr.default_journal_dir() == str(tmp_path / "state" / "sifoverlay" / "journal")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jr.default_journal_dir() == str(tmp_path / "home" / ".local" / "state" / "sifoverlay" / "journal")


def test_dead_segments_never_touch_live_objects() -> None:
    live = [(100, 200), (300, 400)]
    assert dead_segments(((50, 100), (250, 100), (390, 50)), live, 1000) == [(50, 100), (250, 300), (400, 440)]
    assert dead_segments(((350, 300),), live, 500) == [(400, 500)]  # past the data end: truncated, not punched
    assert dead_segments(((120, 10),), live, 1000) == []


def test_blend_of_accepts_only_bytes_from_either_image() -> None:
    before, after = b"aaaaaaaa", b"bbbbbbbb"
    assert blend_of(b"bbbbaaaa", before, after)
    assert blend_of(before, before, after) and blend_of(after, before, after)
    assert not blend_of(b"bbbbcaaa", before, after)
    assert not blend_of(b"bbbb", before, after)
