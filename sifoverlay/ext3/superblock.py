"""Parse the ext2/3/4 superblock of a byte range without mounting anything.

The superblock is the 1024 bytes at region offset 1024 (test-stack-lowlevel §6). Reading
and parsing it costs microseconds, and its fields change on every rw mount or e2fsprogs
write, while ro mounts change nothing: that makes it the cheap "was the overlay touched"
fingerprint. `check_header` applies SingularityCE's CheckExt3Header rules to the first
2048 bytes of the region.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Final

from sifoverlay.errors import Ext3FormatError

SUPERBLOCK_OFFSET: Final = 1024
SUPERBLOCK_SIZE: Final = 1024
HEADER_BYTES: Final = 2048  # what SingularityCE's CheckExt3Header reads
EXT_MAGIC: Final = 0xEF53

# s_state bits
STATE_CLEAN: Final = 0x1
STATE_ERRORS: Final = 0x2

# feature bits (only the ones we name)
COMPAT_HAS_JOURNAL: Final = 0x4
INCOMPAT_FILETYPE: Final = 0x2
INCOMPAT_RECOVER: Final = 0x4  # "needs_recovery": journal must be replayed
INCOMPAT_META_BG: Final = 0x10
INCOMPAT_64BIT: Final = 0x80
RO_COMPAT_SPARSE_SUPER: Final = 0x1
RO_COMPAT_LARGE_FILE: Final = 0x2
RO_COMPAT_BTREE_DIR: Final = 0x4

# SingularityCE pkg/image/ext3.go: the only feature bits an ext3 overlay may carry.
ALLOWED_INCOMPAT: Final = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG
ALLOWED_RO_COMPAT: Final = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR

MIN_LOG_BLOCK_SIZE: Final = 0  # 1 KiB
MAX_LOG_BLOCK_SIZE: Final = 6  # 64 KiB, the largest block size ext4 allows

FINGERPRINT_KEYS: Final = (
    "mnt_count",
    "mtime",
    "wtime",
    "kbytes_written",
    "free_blocks",
    "free_inodes",
    "state",
    "needs_recovery",
)


def _describe(source: int | str | os.PathLike[str]) -> str:
    return f"<fd {source}>" if isinstance(source, int) else os.fspath(source)


def _pread_exact(source: int | str | os.PathLike[str], length: int, offset: int) -> bytes:
    """Read exactly `length` bytes at `offset` from an fd or a path (short read -> error)."""
    if isinstance(source, int):
        data = os.pread(source, length, offset)
    else:
        fd = os.open(os.fspath(source), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
    if len(data) != length:
        raise Ext3FormatError(
            _describe(source),
            f"ext3 region at offset {offset - SUPERBLOCK_OFFSET} is truncated: "
            f"only {len(data)} of {length} superblock bytes present",
        )
    return data


@dataclass(frozen=True, slots=True)
class Ext3Usage:
    """Space and inode accounting of an ext3 filesystem, from its superblock.

    The kernel only writes exact free counts at a clean umount, so while an image is
    mounted rw (or after a crash, before fsck) these numbers may be stale.
    """

    block_size: int
    blocks_count: int
    free_blocks: int
    reserved_blocks: int
    inodes_count: int
    free_inodes: int

    @property
    def size_bytes(self) -> int:
        return self.blocks_count * self.block_size

    @property
    def free_bytes(self) -> int:
        return self.free_blocks * self.block_size

    @property
    def available_bytes(self) -> int:
        """Free space an unprivileged writer can use (root-reserved blocks excluded)."""
        return max(0, self.free_blocks - self.reserved_blocks) * self.block_size

    @property
    def used_bytes(self) -> int:
        return self.size_bytes - self.free_bytes


@dataclass(frozen=True, slots=True)
class Superblock:
    """The fields of an ext2/3/4 superblock that the overlay manager relies on."""

    inodes_count: int
    blocks_count: int
    reserved_blocks: int
    free_blocks: int
    free_inodes: int
    log_block_size: int
    mtime: int
    wtime: int
    mnt_count: int
    state: int
    lastcheck: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    uuid: str
    kbytes_written: int
    error_count: int

    @classmethod
    def read(
        cls, fd_or_path: int | str | os.PathLike[str], offset: int = 0, *, size: int | None = None
    ) -> Superblock:
        """Read and validate the superblock of the ext fs starting at `offset`.

        `size` (the region length) is checked against blocks_count * block_size when given.
        """
        raw = _pread_exact(fd_or_path, SUPERBLOCK_SIZE, offset + SUPERBLOCK_OFFSET)
        return cls.parse(raw, path=_describe(fd_or_path), region_size=size)

    @classmethod
    def parse(cls, raw: bytes, *, path: str | None = None, region_size: int | None = None) -> Superblock:
        """Parse 1024 superblock bytes; raise Ext3FormatError on anything implausible."""
        if len(raw) < SUPERBLOCK_SIZE:
            raise Ext3FormatError(path, f"superblock needs {SUPERBLOCK_SIZE} bytes, got {len(raw)}")
        (magic,) = struct.unpack_from("<H", raw, 56)
        if magic != EXT_MAGIC:
            raise Ext3FormatError(path, f"no ext2/3/4 superblock: magic is 0x{magic:04x}, expected 0xef53")
        inodes_count, blocks_lo, r_blocks_lo, free_lo, free_inodes = struct.unpack_from("<5I", raw, 0)
        (log_block_size,) = struct.unpack_from("<I", raw, 24)
        mtime, wtime, mnt_count = struct.unpack_from("<IIH", raw, 44)
        (state,) = struct.unpack_from("<H", raw, 58)
        (lastcheck,) = struct.unpack_from("<I", raw, 64)
        compat, incompat, ro_compat = struct.unpack_from("<III", raw, 92)
        (kbytes_written,) = struct.unpack_from("<Q", raw, 376)
        (error_count,) = struct.unpack_from("<I", raw, 404)
        blocks, r_blocks, free = blocks_lo, r_blocks_lo, free_lo
        if incompat & INCOMPAT_64BIT:  # high halves only exist on 64bit filesystems
            blocks_hi, r_blocks_hi, free_hi = struct.unpack_from("<III", raw, 0x150)
            blocks |= blocks_hi << 32
            r_blocks |= r_blocks_hi << 32
            free |= free_hi << 32
        if not MIN_LOG_BLOCK_SIZE <= log_block_size <= MAX_LOG_BLOCK_SIZE:
            raise Ext3FormatError(path, f"implausible ext block size: s_log_block_size={log_block_size}")
        block_size = 1024 << log_block_size
        if blocks == 0 or inodes_count == 0:
            raise Ext3FormatError(path, f"implausible ext superblock: {blocks} blocks, {inodes_count} inodes")
        if free > blocks or r_blocks > blocks or free_inodes > inodes_count:
            raise Ext3FormatError(
                path,
                f"implausible ext superblock counts: free blocks {free} / reserved {r_blocks} of {blocks}, "
                f"free inodes {free_inodes} of {inodes_count}",
            )
        if region_size is not None and blocks * block_size > region_size:
            raise Ext3FormatError(
                path,
                f"ext filesystem of {blocks} blocks x {block_size} bytes = {blocks * block_size} bytes "
                f"does not fit its {region_size}-byte region",
            )
        return cls(
            inodes_count=inodes_count,
            blocks_count=blocks,
            reserved_blocks=r_blocks,
            free_blocks=free,
            free_inodes=free_inodes,
            log_block_size=log_block_size,
            mtime=mtime,
            wtime=wtime,
            mnt_count=mnt_count,
            state=state,
            lastcheck=lastcheck,
            feature_compat=compat,
            feature_incompat=incompat,
            feature_ro_compat=ro_compat,
            uuid=raw[104:120].hex(),
            kbytes_written=kbytes_written,
            error_count=error_count,
        )

    @property
    def block_size(self) -> int:
        return 1024 << self.log_block_size

    @property
    def needs_recovery(self) -> bool:
        """Kernel rw mount in progress or crashed: the journal must be replayed."""
        return bool(self.feature_incompat & INCOMPAT_RECOVER)

    @property
    def is_clean(self) -> bool:
        """s_state says clean (fuse2fs clears this bit while mounted rw) and no errors."""
        return bool(self.state & STATE_CLEAN) and not self.state & STATE_ERRORS

    @property
    def is_dirty(self) -> bool:
        """Mounted rw, crashed, or marked with errors: fsck before reading or hashing."""
        return self.needs_recovery or not self.is_clean

    @property
    def usage(self) -> Ext3Usage:
        return Ext3Usage(
            block_size=self.block_size,
            blocks_count=self.blocks_count,
            free_blocks=self.free_blocks,
            reserved_blocks=self.reserved_blocks,
            inodes_count=self.inodes_count,
            free_inodes=self.free_inodes,
        )

    @property
    def free_bytes(self) -> int:
        return self.free_blocks * self.block_size

    def fingerprint(self) -> dict[str, Any]:
        """The tuple that changes on every rw mount and every e2fsprogs write (§6).

        JSON-serialisable, keys always in FINGERPRINT_KEYS order. Take it after any fsck:
        e2fsck itself changes wtime and kbytes_written.
        """
        values = {
            "mnt_count": self.mnt_count,
            "mtime": self.mtime,
            "wtime": self.wtime,
            "kbytes_written": self.kbytes_written,
            "free_blocks": self.free_blocks,
            "free_inodes": self.free_inodes,
            "state": self.state,
            "needs_recovery": self.needs_recovery,
        }
        return {key: values[key] for key in FINGERPRINT_KEYS}


def free_bytes(fd_or_path: int | str | os.PathLike[str], offset: int = 0, *, size: int | None = None) -> int:
    """Free bytes of the ext fs at `offset`, from its superblock."""
    return Superblock.read(fd_or_path, offset, size=size).free_bytes


def usage(fd_or_path: int | str | os.PathLike[str], offset: int = 0, *, size: int | None = None) -> Ext3Usage:
    return Superblock.read(fd_or_path, offset, size=size).usage


def check_header(header: bytes, *, path: str | os.PathLike[str] | None = None) -> None:
    """SingularityCE's CheckExt3Header on the first 2048 bytes of an overlay region.

    Magic 0xEF53 at byte 1080; compat must have has_journal; incompat only
    filetype|recover|meta_bg; ro_compat only sparse_super|large_file|btree_dir. An ext2
    (no journal) or ext4-featured filesystem is rejected with one Ext3FormatError.
    """
    where = os.fspath(path) if path is not None else None
    if len(header) < HEADER_BYTES:
        raise Ext3FormatError(where, f"ext3 header needs {HEADER_BYTES} bytes, got {len(header)}")
    sb = header[SUPERBLOCK_OFFSET:HEADER_BYTES]
    (magic,) = struct.unpack_from("<H", sb, 56)
    if magic != EXT_MAGIC:
        raise Ext3FormatError(where, f"not an ext3 filesystem: magic at byte 1080 is 0x{magic:04x}, expected 0xef53")
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    if not compat & COMPAT_HAS_JOURNAL:
        raise Ext3FormatError(where, "not an ext3 filesystem: no journal (has_journal missing; ext2?)")
    if incompat & ~ALLOWED_INCOMPAT:
        raise Ext3FormatError(
            where,
            f"ext3 overlay has unsupported incompatible features 0x{incompat & ~ALLOWED_INCOMPAT:x} "
            "(ext4-featured filesystem?)",
        )
    if ro_compat & ~ALLOWED_RO_COMPAT:
        raise Ext3FormatError(
            where,
            f"ext3 overlay has unsupported read-only-compatible features 0x{ro_compat & ~ALLOWED_RO_COMPAT:x} "
            "(ext4-featured filesystem?)",
        )


def check_region_header(fd_or_path: int | str | os.PathLike[str], offset: int = 0) -> None:
    """check_header on the first 2048 bytes of the region at `offset`."""
    if isinstance(fd_or_path, int):
        data = os.pread(fd_or_path, HEADER_BYTES, offset)
    else:
        with open(fd_or_path, "rb") as f:
            f.seek(offset)
            data = f.read(HEADER_BYTES)
    check_header(data, path=_describe(fd_or_path))
