"""Revision history (issue 18 item 1): every commit records one revision inside the image,
in the same journaled commit; `sifoverlay log` reads it back newest first; the cap drops
the oldest; the image stays what SingularityCE and the Go library read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine.history import Who
from sifoverlay.ocisif import open_image
from sifoverlay.ocisif.history import HISTORY_MEDIA_TYPE, HISTORY_NAME, find_descriptor
from sifoverlay.ocisif.model import iter_refs
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.load import SifFile
from tests.conftest import require_tool
from tests.engine.conftest import assert_consistent, modify_overlay, sh

CLI = [sys.executable, "-m", "sifoverlay"]


def log_json(image: Path) -> dict:
    proc = subprocess.run([*CLI, "log", "--json", str(image)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def manifest_digest(image: Path) -> str:
    with open_image(image) as img:
        return img.manifest.digest


def recorded(image: Path) -> str:
    with open_image(image) as img:
        return img.overlay.recorded_digest  # type: ignore[union-attr]


def test_create_sync_seal_each_record_one_revision_newest_first(base_image: Path, tmp_path: Path) -> None:
    require_tool("mkfs.ext3", "debugfs", "fuse2fs", "tar2sqfs")
    m0 = manifest_digest(base_image)
    engine.create_overlay(base_image, sparse=True)
    m1, d1 = manifest_digest(base_image), recorded(base_image)
    modify_overlay(base_image, tmp_path, b"job output\n")
    who = Who(job_id="4242", cluster="testcluster", uid=1234, user="alice", node="node7", exit_state="COMPLETED",
              via="epilog")
    synced = engine.sync(base_image, who=who)
    m2, d2 = manifest_digest(base_image), recorded(base_image)
    assert synced.new_digest == d2 != d1
    sealed = engine.seal(base_image)
    m3 = manifest_digest(base_image)

    log = log_json(base_image)
    assert log["dropped"] == 0
    assert [r["seq"] for r in log["revisions"]] == [3, 2, 1]
    assert [r["op"] for r in log["revisions"]] == ["seal", "sync", "create"]
    seal_rev, sync_rev, create_rev = log["revisions"]
    assert create_rev["overlay"] == {"old": None, "new": d1}
    assert create_rev["manifest"] == {"old": m0, "new": m1}
    assert create_rev["bytes_hashed"] == 64 << 20
    assert create_rev["who"]["uid"] == os.getuid() and create_rev["who"]["via"] == "cli"
    assert sync_rev["overlay"] == {"old": d1, "new": d2}
    assert sync_rev["manifest"] == {"old": m1, "new": m2}
    assert sync_rev["bytes_hashed"] == 64 << 20
    assert sync_rev["who"] == {"job_id": "4242", "cluster": "testcluster", "uid": 1234, "user": "alice",
                               "node": "node7", "exit_state": "COMPLETED", "via": "epilog"}
    assert seal_rev["overlay"] == {"old": d2, "new": None}
    assert seal_rev["manifest"] == {"old": m2, "new": m3}
    assert seal_rev["detail"] == {"layer": sealed.layer_digest}
    assert seal_rev["bytes_hashed"] == sealed.layer_size
    text = subprocess.run([*CLI, "log", str(base_image)], capture_output=True, text=True, check=True).stdout
    assert text.index("revision 3  seal") < text.index("revision 2  sync") < text.index("revision 1  create")
    assert "job 4242 on testcluster, user alice (uid 1234), node node7, exit COMPLETED, via epilog" in text
    assert subprocess.run([*CLI, "log", "-n", "1", "--json", str(base_image)], capture_output=True, text=True,
                          check=True).stdout.count('"seq"') == 1


def test_history_is_a_generic_json_object_outside_the_oci_graph(overlay_image: Path, tmp_path: Path,
                                                                 siftool: str) -> None:
    """SingularityCE compatibility (docs/format.md §8): the history is a JSON.Generic object
    with no group, linked to the ext3 object, referenced by no OCI JSON; Go's siftool lists
    it; the independent checker (bench/soak.py) finds the image consistent."""
    from bench.soak import check_image

    baseline = check_image(overlay_image)["problems"]  # the Go golden base: its gzip layers' diff_ids != digests
    modify_overlay(overlay_image, tmp_path)
    engine.sync(overlay_image)
    with open_image(overlay_image) as img:
        hist = find_descriptor(img.sif)
        assert hist is not None
        ext3 = img.overlay.descriptor  # type: ignore[union-attr]
        assert hist.datatype == DataType.GENERIC_JSON and hist.name_str == HISTORY_NAME
        assert hist.group_id == 0xF0000000 and hist.linked_id == ext3.id
        referenced = {ref.digest for ref in iter_refs(img.sif)}
        raw = img.sif.read(hist)
        assert json.loads(raw)["mediaType"] == HISTORY_MEDIA_TYPE
        assert not any(d in raw.decode() for d in referenced if d == img.root_index.digest)
        assert sum(1 for d in img.sif.used() if d.datatype == DataType.GENERIC_JSON) == 1
        # SingularityCE's `overlay sync` digest is sha256 of the ext3 range: our descriptor says it
        assert ext3.digest == img.overlay.recorded_digest  # type: ignore[union-attr]
    listing = sh(siftool, "list", str(overlay_image)).stdout
    assert f"{hist.id:<5}|NONE    |{ext3.id:<8}|{hist.offset}-{hist.end}" in listing
    assert "JSON.Generic" in listing
    dumped = subprocess.run([siftool, "dump", str(hist.id), str(overlay_image)], capture_output=True, check=True).stdout
    assert dumped == raw
    info = sh(siftool, "info", str(hist.id), str(overlay_image)).stdout
    assert "JSON.Generic" in info
    checked = check_image(overlay_image)
    assert checked["problems"] == baseline and checked["blobs"] >= 5
    assert checked["overlay_matches"] is True
    assert_consistent(overlay_image)


def test_cap_drops_the_oldest(overlay_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIFOVERLAY_HISTORY_REVISIONS", "3")
    for n in range(5):
        modify_overlay(overlay_image, tmp_path, f"round {n}\n".encode(), name=f"upper/round{n}")
        engine.sync(overlay_image)
    log = log_json(overlay_image)
    assert [r["seq"] for r in log["revisions"]] == [6, 5, 4]
    assert log["dropped"] == 3
    assert all(r["op"] == "sync" for r in log["revisions"])
    assert log["revisions"][0]["overlay"]["new"] == recorded(overlay_image)
    assert log["revisions"][1]["overlay"]["new"] == log["revisions"][0]["overlay"]["old"]
    with SifFile.open(overlay_image) as sif:  # one history object, the old ones freed
        assert sum(1 for d in sif.used() if d.datatype == DataType.GENERIC_JSON) == 1
    assert_consistent(overlay_image)


def test_source_date_epoch_fixes_the_time(overlay_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764892800")
    modify_overlay(overlay_image, tmp_path)
    engine.sync(overlay_image)
    assert log_json(overlay_image)["revisions"][0]["time"] == "2025-12-05T00:00:00Z"


def test_unreadable_history_does_not_block_a_commit(overlay_image: Path, tmp_path: Path) -> None:
    """The image is the user's: a garbled history object is replaced by a fresh history
    that says why; `log` of the garbled one is one line naming the image (exit 2)."""
    with SifFile.open(overlay_image) as sif:
        hist = find_descriptor(sif)
        assert hist is not None
    with open(overlay_image, "r+b") as f:
        f.seek(hist.offset)
        f.write(b"#" * hist.size)
    proc = subprocess.run([*CLI, "log", str(overlay_image)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(overlay_image) in proc.stderr and "not JSON" in proc.stderr
    modify_overlay(overlay_image, tmp_path)
    engine.sync(overlay_image)
    log = log_json(overlay_image)
    assert [r["seq"] for r in log["revisions"]] == [1]
    assert "not JSON" in log["lost"]
    assert_consistent(overlay_image)


def test_a_sync_needs_four_free_slots_and_says_so(overlay_image: Path, tmp_path: Path) -> None:
    """config + manifest + index + history: with 3 free slots nothing is written."""
    from sifoverlay.errors import CapacityError
    from sifoverlay.sif.layout import Layout

    with SifFile.open(overlay_image, writable=True) as sif:
        layout = Layout.from_file(sif)
        while layout.free_slots > 3:
            layout.add(DataType.GENERIC, 0, group=0)
        meta = layout.metadata_bytes()
    with open(overlay_image, "r+b") as f:
        f.write(meta)
    modify_overlay(overlay_image, tmp_path)
    before = overlay_image.read_bytes()
    with pytest.raises(CapacityError) as err:
        engine.sync(overlay_image)
    assert "needs 4 free descriptor slots for sync, only 3 free" in str(err.value)
    assert overlay_image.read_bytes() == before


def test_log_of_an_image_without_history(base_image: Path) -> None:
    proc = subprocess.run([*CLI, "log", str(base_image)], capture_output=True, text=True, check=True)
    assert proc.stdout == f"{base_image}: no revisions recorded\n"
    assert log_json(base_image) == {"image": str(base_image), "dropped": 0, "revisions": []}
