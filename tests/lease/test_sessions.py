"""Job session records in <journal_dir>/sessions/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sifoverlay.engine import sessions
from sifoverlay.errors import JournalError, UsageError
from sifoverlay.fsio import CountingIO


def test_start_finish_roundtrip(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    io = CountingIO(keep_log=True)
    s = sessions.start(journal, "1234", tmp_path / "img.sif", mode="rw", host="node1", uid=1000,
                       source="slurm", details={"lease_token": "abc"}, io=io)
    path = journal / "sessions" / "1234.json"
    data = json.loads(path.read_text())
    assert data["job_id"] == "1234" and data["image"] == str(tmp_path / "img.sif")
    assert (data["mode"], data["host"], data["uid"], data["source"]) == ("rw", "node1", 1000, "slurm")
    assert data["details"] == {"lease_token": "abc"} and data["finished"] is None
    ops = [op for op, _ in io.log]
    assert ops[-3:] == ["fsync", "rename", "fsync_dir"]  # durable (R12)
    assert sessions.open_sessions(journal) == [s]
    done = sessions.finish(journal, "1234", "reconciled", io=io)
    assert done is not None and done.result == "reconciled" and done.finished >= s.started
    assert not path.exists() and sessions.open_sessions(journal) == []
    assert io.log[-1][0] == "fsync_dir"
    assert sessions.finish(journal, "1234", "again") is None  # epilog + sweeper both call it


def test_open_sessions_sorted_and_skip_junk(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    a = sessions.start(journal, "a.1", "/img/a", mode="ro", host="h", uid=1, source="k8s")
    b = sessions.start(journal, "b.2", "/img/b", mode="rw", host="h", uid=2, source="cli")
    (journal / "sessions" / ".b.2.json.tmp.99").write_text("{half")
    (journal / "sessions" / "bad.json").write_text("{half")
    assert [x.job_id for x in sessions.open_sessions(journal)] == [a.job_id, b.job_id]
    assert sessions.open_sessions(tmp_path / "none") == []


def test_requeue_same_image_replaces_other_image_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    first = sessions.start(journal, "77", "/img/a", mode="rw", host="h1", uid=1, source="slurm")
    second = sessions.start(journal, "77", "/img/a", mode="rw", host="h2", uid=1, source="slurm")
    assert sessions.open_sessions(journal) == [second] and second.host == "h2" and first.host == "h1"
    with pytest.raises(JournalError, match="job 77 already has an open session on /img/a"):
        sessions.start(journal, "77", "/img/b", mode="rw", host="h", uid=1, source="slurm")


@pytest.mark.parametrize("job", ["../x", "", "a/b", ".hidden", "x" * 300])
def test_bad_job_ids_refused(tmp_path: Path, job: str) -> None:
    with pytest.raises(UsageError, match="is not usable as a session name"):
        sessions.start(tmp_path, job, "/img", mode="rw", host="h", uid=0, source="cli")
    assert not (tmp_path / "sessions").exists()


def test_bad_mode_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="session mode must be one of rw, ro, not 'x'"):
        sessions.start(tmp_path, "1", "/img", mode="x", host="h", uid=0, source="cli")


def test_unreadable_record_names_file(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "sessions")
    (tmp_path / "sessions" / "5.json").write_text("[]")
    with pytest.raises(JournalError, match="5.json: unreadable session record"):
        sessions.load(tmp_path, "5")
