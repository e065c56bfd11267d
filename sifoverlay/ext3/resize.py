"""Grow or shrink an ext3 filesystem held in a scratch file, and find its free blocks.

Resizing works on a copy (`copy_region` into a scratch file the engine owns), never on the
image: the engine appends the resized copy through its journaled commit, so a crash leaves
the old overlay intact. e2fsck and resize2fs parse user-controlled metadata, so when root
runs them for another user's image they run as that user (tools.unprivileged_argv) on the
one descriptor passed to them (/proc/self/fd/N), never by name.

`free_ranges` reads the block bitmaps (plain ext2/3 layout: 32-byte group descriptors,
no uninit_bg - SingularityCE's header check refuses other features) so compact can punch
the bytes of free blocks; it only reads, bounded by the region.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Iterator

from sifoverlay.errors import Ext3FormatError, ExternalToolError
from sifoverlay.fsio import REAL_IO, FileIO

from . import tools
from .superblock import Superblock

_CHUNK = 4 << 20
FSCK_OK = (0, 1)  # e2fsck: no errors / errors corrected
TOOL_TIMEOUT = 1800.0


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data (not holes) of fd within [start, end)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def copy_region(src: int, offset: int, size: int, dst: int, io: FileIO = REAL_IO) -> None:
    """Copy [offset, offset+size) of src to [0, size) of the empty file dst, holes kept."""
    io.truncate(dst, size)
    for start, length in data_extents(src, offset, offset + size):
        pos = start
        while pos < start + length:
            chunk = os.pread(src, min(_CHUNK, start + length - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "short read while copying the ext3 region")
            io.pwrite(dst, chunk, pos - offset)
            pos += len(chunk)


def _run(argv: list[str], fd: int, as_user: tuple[int, int] | None, what: str) -> subprocess.CompletedProcess[str]:
    full = (tools.unprivileged_argv(*as_user) if as_user is not None else []) + argv
    env = {"PATH": tools.TOOL_PATH, "LC_ALL": "C", "E2FSCK_CONFIG": "/dev/null"}
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():  # reproducible runs: e2fsprogs stamps this time instead of the clock
        env["E2FSPROGS_FAKE_TIME"] = env["E2FSCK_TIME"] = epoch
    try:
        return subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              cwd="/", env=env, pass_fds=(fd,), timeout=TOOL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ExternalToolError(what, f"{argv[0]} timed out after {TOOL_TIMEOUT:.0f} s", tool=argv[0],
                                returncode=-1, output_tail="") from None


def resize_fs(fd: int, new_size: int, *, as_user: tuple[int, int] | None = None, io: FileIO = REAL_IO,
              name: str = "overlay") -> Superblock:
    """Resize the filesystem in the scratch file `fd` to exactly `new_size` bytes
    (e2fsck -f -p first, as resize2fs demands; then resize2fs; the file is extended before
    a grow and cut after a shrink). Returns the new superblock. `name` names the image in
    errors."""
    current = os.fstat(fd).st_size
    os.set_inheritable(fd, True)
    target = f"/proc/self/fd/{fd}"
    if new_size > current:
        io.truncate(fd, new_size)
    proc = _run(["e2fsck", "-f", "-p", target], fd, as_user, name)
    if proc.returncode not in FSCK_OK:
        raise ExternalToolError(name, f"e2fsck of the overlay copy failed (exit {proc.returncode}): "
                                f"{tools.output_tail(proc.stdout + proc.stderr)}", tool="e2fsck",
                                returncode=proc.returncode, output_tail=tools.output_tail(proc.stdout + proc.stderr))
    proc = _run(["resize2fs", target, f"{new_size // 1024}K"], fd, as_user, name)
    if proc.returncode != 0:
        raise ExternalToolError(name, f"resize2fs failed (exit {proc.returncode}): "
                                f"{tools.output_tail(proc.stdout + proc.stderr)}", tool="resize2fs",
                                returncode=proc.returncode, output_tail=tools.output_tail(proc.stdout + proc.stderr))
    if new_size < current:
        io.truncate(fd, new_size)
    sb = Superblock.read(fd, 0, size=new_size)
    if sb.blocks_count * sb.block_size != new_size:
        raise Ext3FormatError(name, f"resize2fs left {sb.blocks_count * sb.block_size} bytes of filesystem, "
                              f"wanted {new_size}")
    return sb


_GROUP_DESC = struct.Struct("<III")  # block bitmap, inode bitmap, inode table (ext2/3 32-byte descriptor)


def free_ranges(fd: int, offset: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges (relative to the region) of the free blocks of the ext2/3 filesystem at
    `offset`, merged; Ext3FormatError for layouts this reader does not know."""
    sb = Superblock.read(fd, offset, size=size)
    raw = os.pread(fd, 1024, offset + 1024)
    if len(raw) < 1024:
        raise Ext3FormatError(None, "superblock truncated")
    first_data_block, = struct.unpack_from("<I", raw, 20)
    blocks_per_group, = struct.unpack_from("<I", raw, 32)
    desc_size = 32
    if sb.feature_incompat & 0x80:  # 64bit
        raise Ext3FormatError(None, "64bit ext4 layout: compact supports ext2/ext3 overlays only")
    if sb.feature_ro_compat & 0x10 or sb.feature_incompat & 0x10:  # uninit_bg / meta_bg
        raise Ext3FormatError(None, "uninit_bg/meta_bg layout: compact supports plain ext2/ext3 overlays only")
    bs = sb.block_size
    if blocks_per_group == 0 or blocks_per_group > bs * 8:
        raise Ext3FormatError(None, f"implausible blocks per group {blocks_per_group}")
    total = sb.blocks_count
    if total * bs > size:
        raise Ext3FormatError(None, f"filesystem of {total * bs} bytes is larger than its {size} byte region")
    groups = (total - first_data_block + blocks_per_group - 1) // blocks_per_group
    table = os.pread(fd, groups * desc_size, offset + (first_data_block + 1) * bs)
    if len(table) < groups * desc_size:
        raise Ext3FormatError(None, "group descriptor table truncated")
    out: list[tuple[int, int]] = []
    for group in range(groups):
        bitmap_block, _, _ = _GROUP_DESC.unpack_from(table, group * desc_size)
        if not first_data_block <= bitmap_block < total:
            raise Ext3FormatError(None, f"group {group}: block bitmap at {bitmap_block} is outside the filesystem")
        bitmap = os.pread(fd, bs, offset + bitmap_block * bs)
        base = first_data_block + group * blocks_per_group
        count = min(blocks_per_group, total - base)
        for lo, hi in _zero_bit_runs(bitmap, count):
            start, end = (base + lo) * bs, (base + hi) * bs
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


def _zero_bit_runs(bitmap: bytes, count: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs of clear bits among the first `count` bits (LSB first), a whole byte
    at a time where it is 0x00 or 0xff (large filesystems have 32768 bits per group)."""
    run_start = None
    i = 0
    while i < count:
        byte = bitmap[i >> 3] if (i >> 3) < len(bitmap) else 0xFF
        if not i & 7 and i + 8 <= count and byte in (0, 0xFF):
            if byte == 0 and run_start is None:
                run_start = i
            elif byte == 0xFF and run_start is not None:
                yield run_start, i
                run_start = None
            i += 8
            continue
        free = not byte & (1 << (i & 7))
        if free and run_start is None:
            run_start = i
        elif not free and run_start is not None:
            yield run_start, i
            run_start = None
        i += 1
    if run_start is not None:
        yield run_start, count


def hash_as_zeroed(fd: int, offset: int, size: int, zeroed: list[tuple[int, int]]) -> str:
    """sha256 of [offset, offset+size) as it will read once the absolute ranges `zeroed`
    (sorted, inside the region) are punched: those bytes count as zeros."""
    import hashlib

    digest = hashlib.sha256()
    zeros = bytes(_CHUNK)
    pos, end = offset, offset + size
    for start, stop in sorted(zeroed) + [(end, end)]:
        start, stop = max(start, pos), min(stop, end)
        while pos < start:
            chunk = os.pread(fd, min(_CHUNK, start - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "short read while hashing the ext3 region")
            digest.update(chunk)
            pos += len(chunk)
        while pos < stop:
            n = min(_CHUNK, stop - pos)
            digest.update(zeros[:n])
            pos += n
    return "sha256:" + digest.hexdigest()
