"""Superblock parsing, fingerprint semantics and SingularityCE's header check."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.errors import Ext3FormatError
from tests.conftest import require_tool
from tests.ext3.conftest import MIB, fuse2fs_mount, kernel_mount, sh


def dumpe2fs(image: Path, offset: int = 0) -> dict[str, str]:
    require_tool("dumpe2fs")
    target = f"{image}?offset={offset}" if offset else str(image)
    out = sh("dumpe2fs", "-h", target).stdout
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def test_fields_match_dumpe2fs(overlay_img: Path) -> None:
    sb = ext3.Superblock.read(overlay_img, 0, size=64 * MIB)
    info = dumpe2fs(overlay_img)
    assert sb.block_size == int(info["Block size"]) == 1024
    assert sb.blocks_count == int(info["Block count"]) == 65536
    assert sb.free_blocks == int(info["Free blocks"])
    assert sb.free_inodes == int(info["Free inodes"])
    assert sb.reserved_blocks == int(info["Reserved block count"])
    assert sb.mnt_count == int(info["Mount count"])
    assert sb.uuid == info["Filesystem UUID"].replace("-", "")
    assert info["Filesystem state"] == "clean" and sb.is_clean and not sb.is_dirty
    assert not sb.needs_recovery
    assert sb.free_bytes == sb.free_blocks * 1024 == ext3.free_bytes(overlay_img)
    use = ext3.usage(overlay_img)
    assert use.size_bytes == 64 * MIB
    assert use.available_bytes == (sb.free_blocks - sb.reserved_blocks) * 1024
    assert use.used_bytes == 64 * MIB - sb.free_bytes


def test_fingerprint_is_stable_json(overlay_img: Path) -> None:
    fp = ext3.Superblock.read(overlay_img).fingerprint()
    assert list(fp) == list(ext3.FINGERPRINT_KEYS) == [
        "mnt_count", "mtime", "wtime", "kbytes_written", "free_blocks", "free_inodes", "state", "needs_recovery",
    ]
    assert json.loads(json.dumps(fp)) == fp
    fd = os.open(overlay_img, os.O_RDONLY)
    try:
        assert ext3.Superblock.read(fd, 0).fingerprint() == fp  # fd and path agree
    finally:
        os.close(fd)


def test_read_at_offset_inside_bigger_file(overlay_img: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    offset = 3 * MIB + 12345
    with open(big, "wb") as f:
        f.write(os.urandom(4096))
        f.seek(offset)
        f.write(overlay_img.read_bytes())
        f.write(b"tail")
    assert ext3.Superblock.read(big, offset, size=64 * MIB) == ext3.Superblock.read(overlay_img)


def _patched(src: Path, dst: Path, sb_offset: int, fmt: str, value: int) -> Path:
    data = bytearray(src.read_bytes()[: 64 * 1024])
    struct.pack_into(fmt, data, 1024 + sb_offset, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(
    ("sb_offset", "fmt", "value", "words"),
    [
        (56, "<H", 0x1234, "magic is 0x1234"),
        (24, "<I", 40, "s_log_block_size=40"),
        (4, "<I", 0, "0 blocks"),
        (12, "<I", 0xFFFFFFF0, "implausible ext superblock counts"),
    ],
)
def test_bad_superblocks_raise_one_line(overlay_img: Path, tmp_path: Path, sb_offset: int, fmt: str,
                                        value: int, words: str) -> None:
    bad = _patched(overlay_img, tmp_path / "bad.img", sb_offset, fmt, value)
    with pytest.raises(Ext3FormatError) as err:
        ext3.Superblock.read(bad)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: ") and words in msg


def test_filesystem_larger_than_region(overlay_img: Path) -> None:
    with pytest.raises(Ext3FormatError, match=r"67108864 bytes does not fit its 67107840-byte region"):
        ext3.Superblock.read(overlay_img, 0, size=64 * MIB - 1024)


def test_truncated_region(tmp_path: Path) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(b"\0" * 1500)
    with pytest.raises(Ext3FormatError, match=r"short.img: .*only 476 of 1024 superblock bytes"):
        ext3.Superblock.read(short)


# --- SingularityCE CheckExt3Header ----------------------------------------------------


def test_check_header_accepts_vector_and_our_images(vectors: Path, overlay_img: Path) -> None:
    vector = vectors / "singularity" / "extfs-for-overlay.img"
    ext3.check_header(vector.read_bytes()[:2048], path=vector)
    ext3.check_region_header(overlay_img)


@pytest.mark.parametrize(
    ("mkfs", "extra", "words"),
    [
        ("mkfs.ext2", [], "no journal"),
        ("mkfs.ext4", [], "unsupported incompatible features 0x"),  # extents, 64bit, flex_bg
        ("mkfs.ext3", ["-O", "metadata_csum"], "unsupported read-only-compatible features 0x400"),
    ],
)
def test_check_header_rejects_other_filesystems(tmp_path: Path, mkfs: str, extra: list[str], words: str) -> None:
    require_tool(mkfs)
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    sh(mkfs, "-q", "-F", *extra, str(img))
    with pytest.raises(Ext3FormatError) as err:
        ext3.check_region_header(img)
    assert words in str(err.value) and str(err.value).startswith(f"{img}: ")
    if mkfs == "mkfs.ext4":
        incompat = int(re.search(r"features 0x([0-9a-f]+)", str(err.value)).group(1), 16)
        assert incompat & 0x40  # extents is among the refused bits


def test_check_header_rejects_garbage_and_short_input() -> None:
    with pytest.raises(Ext3FormatError, match=r"^x.bin: not an ext3 filesystem: magic at byte 1080 is 0x0000"):
        ext3.check_header(bytes(2048), path="x.bin")
    with pytest.raises(Ext3FormatError, match=r"needs 2048 bytes, got 100"):
        ext3.check_header(bytes(100), path="x.bin")


# --- what changes the fingerprint (real mounts) ----------------------------------------


def test_fuse2fs_ro_mount_keeps_fingerprint_rw_mount_changes_it(overlay_img: Path, tmp_path: Path) -> None:
    before = ext3.Superblock.read(overlay_img).fingerprint()
    digest_before = ext3.hash_range(str(overlay_img), 0, 64 * MIB)
    with fuse2fs_mount(overlay_img, tmp_path / "mnt", read_only=True) as mnt:
        assert sorted(os.listdir(mnt)) == ["lost+found", "upper", "work"]
    assert ext3.Superblock.read(overlay_img).fingerprint() == before
    assert ext3.hash_range(str(overlay_img), 0, 64 * MIB) == digest_before

    with fuse2fs_mount(overlay_img, tmp_path / "mnt") as mnt:
        during = ext3.Superblock.read(overlay_img)
        assert during.is_dirty and not during.is_clean and not during.needs_recovery  # fuse2fs: state bit 0
        (mnt / "upper" / "new").write_bytes(b"x" * 5000)
    after = ext3.Superblock.read(overlay_img)
    assert after.is_clean and not after.is_dirty
    fp = after.fingerprint()
    assert fp["mnt_count"] == before["mnt_count"] + 1
    assert fp["free_inodes"] == before["free_inodes"] - 1
    assert fp["free_blocks"] < before["free_blocks"]
    assert fp != before


def test_kernel_rw_mount_sets_needs_recovery_until_umount(overlay_img: Path, tmp_path: Path) -> None:
    before = ext3.Superblock.read(overlay_img).fingerprint()
    with kernel_mount(overlay_img, tmp_path / "mnt", read_only=True):
        assert ext3.Superblock.read(overlay_img).fingerprint() == before
    assert ext3.Superblock.read(overlay_img).fingerprint() == before
    with kernel_mount(overlay_img, tmp_path / "mnt"):
        during = ext3.Superblock.read(overlay_img)
        assert during.needs_recovery and during.is_dirty and during.is_clean
    after = ext3.Superblock.read(overlay_img)
    assert not after.is_dirty
    assert after.mnt_count == before["mnt_count"] + 1
