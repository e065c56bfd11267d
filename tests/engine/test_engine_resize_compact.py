"""`overlay resize` and `overlay compact` (issue 18 items 3, 4) on real ext3 overlays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine.compact import compact
from sifoverlay.engine.resize import resize
from sifoverlay.errors import OverlayStateError
from sifoverlay.ocisif import open_image
from tests.conftest import require_tool
from tests.engine.conftest import assert_consistent, debugfs_cat, modify_overlay, region, sh

CLI = [sys.executable, "-m", "sifoverlay"]


def revisions(image: Path) -> list[dict]:
    out = subprocess.run([*CLI, "log", "--json", str(image)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["revisions"]


def fsck_clean(image: Path) -> None:
    offset, _ = region(image)
    sh("e2fsck", "-fn", f"{image}?offset={offset}")


def test_grow_keeps_the_files_and_adds_the_space(overlay_image: Path, tmp_path: Path) -> None:
    require_tool("resize2fs", "e2fsck", "debugfs")
    payload = os.urandom(3 << 20)
    modify_overlay(overlay_image, tmp_path, payload, name="upper/data.bin")
    engine.sync(overlay_image)
    before = engine.status(overlay_image).capacity
    old_digest = engine.status(overlay_image).recorded_digest
    done = subprocess.run([*CLI, "overlay", "resize", "--size", "0.25G", "--json", str(overlay_image)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["action"] == "resized" and result["layer_size"] == 256 << 20
    st = engine.status(overlay_image, verify=True)
    assert st.state == "clean" and st.overlay_size == 256 << 20 and st.actual_digest == result["layer_digest"]
    cap = st.capacity
    assert cap is not None and before is not None
    assert cap["fs_bytes"] == 256 << 20
    assert cap["free_bytes"] > before["free_bytes"] + (170 << 20)
    assert cap["descriptors_free"] == before["descriptors_free"]  # 5 added, 5 freed (old ext3 among them)
    assert debugfs_cat(overlay_image, "upper/data.bin") == payload
    fsck_clean(overlay_image)
    assert_consistent(overlay_image)
    rev = revisions(overlay_image)[0]
    assert rev["op"] == "resize" and rev["overlay"] == {"old": old_digest, "new": result["layer_digest"]}
    assert rev["detail"] == {"old_size": 64 << 20, "new_size": 256 << 20}
    with open_image(overlay_image) as img:  # the new filesystem fills the region exactly
        assert img.layers[-1].size == 256 << 20
    # shrink back (above the used space) works too
    resize(overlay_image, size_mib=64)
    assert engine.status(overlay_image, verify=True).state == "clean"
    assert debugfs_cat(overlay_image, "upper/data.bin") == payload
    fsck_clean(overlay_image)
    assert_consistent(overlay_image)


def test_shrink_below_the_used_space_is_refused_and_nothing_changes(overlay_image: Path, tmp_path: Path) -> None:
    resize(overlay_image, size_mib=128)
    modify_overlay(overlay_image, tmp_path, os.urandom(70 << 20), name="upper/big.bin")
    engine.sync(overlay_image)
    before = overlay_image.read_bytes()
    with pytest.raises(OverlayStateError, match="cannot shrink the overlay to 64 MiB: .* bytes are in use"):
        resize(overlay_image, size_mib=64)
    assert overlay_image.read_bytes() == before
    done = subprocess.run([*CLI, "overlay", "resize", "--size", "32", str(overlay_image)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "at least 64 MiB" in done.stderr and done.stderr.count("\n") == 1
    assert overlay_image.read_bytes() == before


def test_resize_to_the_same_size_changes_nothing(overlay_image: Path) -> None:
    before = overlay_image.read_bytes()
    assert resize(overlay_image, size_mib=64).action == "unchanged"
    assert overlay_image.read_bytes() == before


def test_compact_lowers_the_allocated_size_after_a_delete(overlay_image: Path, tmp_path: Path) -> None:
    require_tool("debugfs", "e2fsck")
    keep = os.urandom(100_000)
    modify_overlay(overlay_image, tmp_path, keep, name="upper/keep.bin")
    modify_overlay(overlay_image, tmp_path, os.urandom(20 << 20), name="upper/big.bin")
    engine.sync(overlay_image)
    offset, _ = region(overlay_image)
    sh("debugfs", "-w", "-R", "rm upper/big.bin", f"{overlay_image}?offset={offset}")
    engine.sync(overlay_image)
    blocks = os.stat(overlay_image).st_blocks
    synced = engine.status(overlay_image).recorded_digest
    result = compact(overlay_image)
    assert result.action == "compacted" and result.punched_bytes >= 19 << 20
    after = os.stat(overlay_image).st_blocks
    assert after == result.blocks_after and blocks == result.blocks_before
    assert (blocks - after) * 512 >= 19 << 20
    st = engine.status(overlay_image, verify=True)
    assert st.state == "clean" and st.actual_digest == result.new_digest != synced
    assert debugfs_cat(overlay_image, "upper/keep.bin") == keep
    fsck_clean(overlay_image)
    assert_consistent(overlay_image)
    rev = revisions(overlay_image)[0]
    assert rev["op"] == "compact" and rev["overlay"] == {"old": synced, "new": result.new_digest}
    assert rev["detail"] == {"punched_bytes": result.punched_bytes}
    again = subprocess.run([*CLI, "overlay", "compact", "--json", str(overlay_image)], capture_output=True, text=True,
                           check=True)
    assert json.loads(again.stdout)["action"] == "noop", again.stdout


def test_compact_of_zero_free_blocks_changes_no_byte_and_records_nothing(overlay_image: Path) -> None:
    """mkfs leaves some free blocks allocated but zero: punching them changes no byte, so
    nothing is committed (no revision); a second compact finds nothing at all."""
    before = overlay_image.read_bytes()
    revs = revisions(overlay_image)
    first = compact(overlay_image)
    assert first.old_digest == first.new_digest
    assert overlay_image.read_bytes() == before
    assert revisions(overlay_image) == revs
    assert compact(overlay_image).action == "noop"


def test_free_ranges_agree_with_dumpe2fs(overlay_image: Path, tmp_path: Path) -> None:
    """The bitmap reader against e2fsprogs' own list of free blocks."""
    import re

    from sifoverlay.ext3.resize import free_ranges

    modify_overlay(overlay_image, tmp_path, os.urandom(5 << 20), name="upper/x.bin")
    offset, size = region(overlay_image)
    out = sh("dumpe2fs", f"{overlay_image}?offset={offset}").stdout
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    expected: list[tuple[int, int]] = []
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.MULTILINE):
        for part in filter(None, (p.strip() for p in line.split(","))):
            lo, _, hi = part.partition("-")
            start, end = int(lo) * bs, (int(hi or lo) + 1) * bs
            if expected and expected[-1][1] == start:
                expected[-1] = (expected[-1][0], end)
            else:
                expected.append((start, end))
    fd = os.open(overlay_image, os.O_RDONLY)
    try:
        assert free_ranges(fd, offset, size) == expected
    finally:
        os.close(fd)
