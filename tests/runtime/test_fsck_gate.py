"""The kernel-mode gate (ext3.replay_and_fsck(check_only=True)) that runtime.validate
uses: read-only, run unprivileged, on the caller's fd (a file swapped in by name is never
looked at)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.errors import Ext3FormatError
from tests.conftest import require_root, require_tool

pytestmark = pytest.mark.root
OFFSET = 12345  # unaligned, as inside a SIF
SIZE = 4 << 20


def _embedded_ext3(path: Path) -> None:
    fs = path.with_suffix(".fs")
    subprocess.run(["mkfs.ext3", "-q", "-F", str(fs), str(SIZE // 1024)], check=True, capture_output=True)
    with open(path, "wb") as out:
        out.write(os.urandom(OFFSET))
        out.write(fs.read_bytes())
        out.write(b"tail")
    fs.unlink()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _attached(path: Path) -> str:
    return subprocess.run(["losetup", "--associated", str(path)], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    require_root()
    require_tool("mkfs.ext3", "e2fsck", "dumpe2fs", "losetup")
    good = tmp_path / "good.img"
    _embedded_ext3(good)
    swapped = tmp_path / "swapped.img"
    shutil.copyfile(good, swapped)
    return good, swapped


def test_clean_ext3_passes_read_only(images: tuple[Path, Path]) -> None:
    good, _ = images
    digest = _digest(good)
    fd = os.open(good, os.O_RDONLY)
    try:
        result = ext3.replay_and_fsck(good, OFFSET, SIZE, fd=fd, check_only=True)
    finally:
        os.close(fd)
    assert (result.checked, result.returncode, result.replayed, result.fixed) == (True, 0, False, False)
    assert _digest(good) == digest and _attached(good) == ""


def _break(path: Path) -> None:
    """Free-blocks count of group 0 off by one (block group descriptor at fs block 1 for
    1 KiB blocks: bg_free_blocks_count_lo at +12): e2fsck -fn finds it, changes nothing."""
    with open(path, "r+b") as fh:
        fh.seek(OFFSET + 1024 * 2 + 12)
        value = int.from_bytes(fh.read(2), "little")
        fh.seek(-2, os.SEEK_CUR)
        fh.write(((value - 1) & 0xFFFF).to_bytes(2, "little"))


def test_the_fd_is_checked_never_the_path(images: tuple[Path, Path]) -> None:
    good, swapped = images
    _break(swapped)
    fd = os.open(good, os.O_RDONLY)
    try:  # the path names another (broken) inode than the fd the caller validated
        result = ext3.replay_and_fsck(swapped, OFFSET, SIZE, fd=fd, check_only=True)
    finally:
        os.close(fd)
    assert (result.checked, result.returncode) == (True, 0)
    fd = os.open(swapped, os.O_RDONLY)
    try:  # and the other way round: the broken fd is refused whatever the path names
        with pytest.raises(Ext3FormatError):
            ext3.replay_and_fsck(good, OFFSET, SIZE, fd=fd, check_only=True)
    finally:
        os.close(fd)
    assert _attached(swapped) == "" and _attached(good) == ""


def test_inconsistent_ext3_is_refused_without_writing(images: tuple[Path, Path]) -> None:
    good, _ = images
    _break(good)
    digest = _digest(good)
    with pytest.raises(Ext3FormatError) as err:
        ext3.replay_and_fsck(good, OFFSET, SIZE, check_only=True)
    assert err.value.data["tool"] == "e2fsck" and err.value.data["returncode"] == 4
    assert str(err.value).startswith(f"{good}: ext3 overlay at offset {OFFSET} failed e2fsck read-only check (exit 4): ")
    assert "\n" not in str(err.value)
    assert _digest(good) == digest and _attached(good) == ""
