"""Capacity (issue 18 item 2): free bytes / inodes from the ext3 superblock (checked against
dumpe2fs), free descriptor slots, the exact number of slots each commit needs, and the
pre-flight refusal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine.capacity import SLOTS_NEEDED, SLOTS_PER_SYNC, preflight
from sifoverlay.errors import CapacityError
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.layout import Layout
from sifoverlay.sif.load import SifFile
from tests.conftest import require_tool
from tests.engine.conftest import assert_consistent, modify_overlay, region, sh


def free_slots(image: Path) -> int:
    with SifFile.open(image) as sif:
        return sum(1 for d in sif.descriptors if not d.is_used)


def fill_slots(image: Path, leave: int) -> None:
    """Use descriptor slots with empty Generic objects until `leave` are free."""
    with SifFile.open(image) as sif:
        layout = Layout.from_file(sif)
    while layout.free_slots > leave:
        layout.add(DataType.GENERIC, 0, group=0)
    with open(image, "r+b") as f:
        f.write(layout.metadata_bytes())


def dumpe2fs(image: Path) -> dict[str, int]:
    require_tool("dumpe2fs")
    offset, _ = region(image)
    out = sh("dumpe2fs", "-h", f"{image}?offset={offset}").stdout
    fields = dict(re.findall(r"^([A-Za-z ]+):\s+(\d+)$", out, re.MULTILINE))
    return {k: int(v) for k, v in fields.items()}


def test_status_reports_free_bytes_inodes_and_slots_like_dumpe2fs(overlay_image: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path, os.urandom(300_000), name="upper/big")
    engine.sync(overlay_image)
    cap = engine.status(overlay_image).capacity
    assert cap is not None
    fs = dumpe2fs(overlay_image)
    assert cap["free_bytes"] == fs["Free blocks"] * fs["Block size"]
    assert cap["available_bytes"] == (fs["Free blocks"] - fs["Reserved block count"]) * fs["Block size"]
    assert cap["free_inodes"] == fs["Free inodes"] and cap["inodes"] == fs["Inode count"]
    assert cap["fs_bytes"] == fs["Block count"] * fs["Block size"] == 64 << 20
    assert cap["descriptors_free"] == free_slots(overlay_image)
    with SifFile.open(overlay_image) as sif:
        assert cap["descriptors_total"] == sif.header.descriptors_total
    proc = subprocess.run([sys.executable, "-m", "sifoverlay", "overlay", "status", str(overlay_image)],
                          capture_output=True, text=True, check=True)
    assert (f"free: {cap['free_bytes']} bytes ({cap['available_bytes']} for users), {cap['free_inodes']} of "
            f"{cap['inodes']} inodes, {cap['descriptors_free']} of {cap['descriptors_total']} descriptor slots "
            f"(a sync needs 4)") in proc.stdout
    js = json.loads(subprocess.run([sys.executable, "-m", "sifoverlay", "overlay", "status", "--json",
                                    str(overlay_image)], capture_output=True, text=True, check=True).stdout)
    assert js["capacity"] == cap


def test_a_sync_with_exactly_four_free_slots_commits_and_frees_as_many(overlay_image: Path, tmp_path: Path) -> None:
    fill_slots(overlay_image, SLOTS_PER_SYNC)
    modify_overlay(overlay_image, tmp_path)
    assert engine.sync(overlay_image).action == "reconciled"
    assert free_slots(overlay_image) == SLOTS_PER_SYNC  # 4 added, 4 freed (config, manifest, index, history)
    assert_consistent(overlay_image)


def test_create_needs_exactly_five(base_image: Path) -> None:
    require_tool("mkfs.ext3")
    fill_slots(base_image, SLOTS_NEEDED["create"] - 1)
    before = base_image.read_bytes()
    with pytest.raises(CapacityError, match="needs 5 free descriptor slots to add an overlay, only 4 free"):
        engine.create_overlay(base_image, sparse=True)
    assert base_image.read_bytes() == before
    base = base_image.with_name("fresh.sif")
    from tests.conftest import engine_base_source

    base.write_bytes(engine_base_source().read_bytes())
    fill_slots(base, SLOTS_NEEDED["create"])
    engine.create_overlay(base, sparse=True)
    assert free_slots(base) == 3  # ext3 + history stay; the replaced config, manifest, index freed theirs
    assert_consistent(base)


def test_preflight_refuses_with_one_line(overlay_image: Path, tmp_path: Path) -> None:
    fd = os.open(overlay_image, os.O_RDONLY)
    try:
        cap = preflight(str(overlay_image), fd, min_free_bytes=1 << 20)
        assert cap.available_bytes > 1 << 20
        with pytest.raises(CapacityError) as err:
            preflight(str(overlay_image), fd, min_free_bytes=cap.available_bytes + 1)
        assert str(err.value) == (f"{overlay_image}: overlay has {cap.available_bytes} bytes free, less than the "
                                  f"required {cap.available_bytes + 1} (min_free): grow it with `sifoverlay overlay "
                                  "resize` or compact it")
        with pytest.raises(CapacityError, match=f"has {cap.free_inodes} free inodes"):
            preflight(str(overlay_image), fd, min_free_inodes=cap.free_inodes + 1)
    finally:
        os.close(fd)
    fill_slots(overlay_image, SLOTS_PER_SYNC - 1)
    fd = os.open(overlay_image, os.O_RDONLY)
    try:
        with pytest.raises(CapacityError) as err:
            preflight(str(overlay_image), fd)
        assert "only 3 free SIF descriptor slots, the sync at job end needs 4" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        os.close(fd)
