"""The crash-safe commit protocol shared by create, sync and seal (crash-safety.md R1-R5).

    INTENT (journal, fsync, dir fsync)
    -> append new blobs past the furthest live object -> fsync(image)
    -> BLOBS_DURABLE (journal, fsync)
    -> ONE pwrite of the [0, DataOffset) after-image (header + whole descriptor table)
    -> fsync(image) -> COMMITTED (journal, fsync)
    -> GC: punch the freed objects' bytes that no live object overlaps, truncate only
       trailing dead space -> fsync(image) -> entry unlinked + dir fsync.

The commit point is the metadata write. It is larger than a sector, so the INTENT holds
the whole after-image (redo) and the before-image (undo): recovery rewrites it wholesale
after a torn write. Before the commit the old state is fully intact (nothing referenced
is overwritten, R2); after it the new state is complete (blobs were durable first).
Every step is "make bytes X equal B", so replaying any prefix twice is harmless (R5).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

from sifoverlay.errors import JournalError
from sifoverlay.fsio import REAL_IO, FileIO
from sifoverlay.sif.constants import DESCRIPTOR_SIZE, HEADER_SIZE
from sifoverlay.sif.descriptor import Descriptor
from sifoverlay.sif.header import Header

from .journal import BlobPlacement, EntryWriter, Intent, Journal, Kind, new_op_id
from .leaselock import metadata_lock

log = logging.getLogger(__name__)

COPY_CHUNK = 4 << 20
SMALL_BLOB_LIMIT = 1 << 20  # blobs up to this size are also kept in the journal


@dataclass(frozen=True, slots=True)
class BlobSource:
    """Bytes of a blob to append: in memory (JSON) or a file (ext3 / squashfs image)."""

    digest: str
    size: int
    data: bytes | None = field(default=None, repr=False)
    path: str | None = None
    sparse: bool = True  # False: copy every byte, so the space is really allocated


@dataclass(frozen=True, slots=True)
class PlacedBlob:
    offset: int
    source: BlobSource


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """Everything one operation will change, computed by engine.plan (pure)."""

    op: str
    before: bytes = field(repr=False)
    after: bytes = field(repr=False)
    blobs: tuple[PlacedBlob, ...]
    freed: tuple[tuple[int, int], ...]
    old_length: int
    new_length: int
    old_root_digest: str | None
    new_root_digest: str
    extra: dict[str, object] = field(default_factory=dict)
    zeroed: tuple[tuple[int, int], ...] = ()  # ranges inside live objects punched after the commit (compact)


def live_ranges(metadata: bytes) -> list[tuple[int, int]]:
    """(offset, end) of every used object described by a [0, DataOffset) image."""
    header = Header.unpack(metadata[:HEADER_SIZE])
    out = []
    for i in range(header.descriptors_total):
        start = header.descriptors_offset + i * DESCRIPTOR_SIZE
        desc = Descriptor.unpack(metadata[start : start + DESCRIPTOR_SIZE])
        if desc.is_used and desc.size > 0:
            out.append((desc.offset, desc.end))
    return sorted(out)


def data_end(metadata: bytes) -> int:
    header = Header.unpack(metadata[:HEADER_SIZE])
    return header.data_offset + header.data_size


def dead_segments(freed: tuple[tuple[int, int], ...], live: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Parts of the freed ranges below `limit` that no live object overlaps, merged."""
    segments: list[tuple[int, int]] = []
    for offset, size in sorted(freed):
        pieces = [(offset, min(offset + size, limit))]
        for lo, hi in live:
            nxt = []
            for a, b in pieces:
                if hi <= a or lo >= b:
                    nxt.append((a, b))
                    continue
                if a < lo:
                    nxt.append((a, lo))
                if hi < b:
                    nxt.append((hi, b))
            pieces = nxt
        segments += [(a, b) for a, b in pieces if b > a]
    merged: list[tuple[int, int]] = []
    for a, b in sorted(segments):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, COPY_CHUNK), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def hash_file_range(fd: int, offset: int, size: int) -> str:
    from sifoverlay.ext3.hashing import hash_range

    return hash_range(fd, offset, size)


# --- blob writing ------------------------------------------------------------------------
def _copy_file(src_path: str, dst_fd: int, dst_offset: int, size: int, io: FileIO, *, sparse: bool) -> None:
    """Copy `size` bytes of src into dst at dst_offset. Sparse: data extents only, the
    holes of the source stay holes (the destination range is fresh: zero-filled by
    truncate). Not sparse: every byte, so the filesystem allocates the whole range."""
    from sifoverlay.ext3.hashing import next_data, next_hole  # lazy: keeps the no-op sync import light

    from sifoverlay.fsio import open_regular

    src = open_regular(src_path, os.O_RDONLY)  # our scratch file in the state dir: still checked
    try:
        pos = 0
        while pos < size:
            if sparse:
                pos = next_data(src, pos, size)
                hole = next_hole(src, pos, size) if pos < size else size
                if hole <= pos < size:  # never spin on a bogus SEEK_HOLE answer
                    hole = size
            else:
                hole = size
            while pos < hole:
                chunk = os.pread(src, min(COPY_CHUNK, hole - pos), pos)
                if not chunk:
                    raise JournalError(src_path, f"short read at {pos} while copying a blob")
                io.pwrite(dst_fd, chunk, dst_offset + pos)
                pos += len(chunk)
    finally:
        os.close(src)


def write_blobs(fd: int, blobs: tuple[PlacedBlob, ...], io: FileIO) -> None:
    """Append the planned blobs. Space past the current end is made by truncate (holes);
    a blob placed over old dead bytes inside the file gets them zeroed first."""
    if not blobs:
        return
    length = os.fstat(fd).st_size
    end = max(b.offset + b.source.size for b in blobs)
    for blob in blobs:
        if blob.offset < length and blob.source.data is None:
            _zero(fd, blob.offset, min(length, blob.offset + blob.source.size), io)
    if end > length:
        io.truncate(fd, end)
    for blob in blobs:
        src = blob.source
        if src.data is not None:
            io.pwrite(fd, src.data, blob.offset)
        elif src.path is not None:
            _copy_file(src.path, fd, blob.offset, src.size, io, sparse=src.sparse)
        else:
            raise ValueError(f"blob {src.digest} has no bytes")


def _zero(fd: int, start: int, end: int, io: FileIO) -> None:
    zeros = bytes(min(COPY_CHUNK, max(0, end - start)))
    while start < end:
        n = min(len(zeros), end - start)
        io.pwrite(fd, zeros[:n], start)
        start += n


# --- the protocol ------------------------------------------------------------------------
def make_intent(image: str, fd: int, plan: CommitPlan, *, job: str | None) -> Intent:
    from .statedir import identity_key

    st = os.fstat(fd)
    small = {
        b.source.digest: b.source.data
        for b in plan.blobs
        if b.source.data is not None and len(b.source.data) <= SMALL_BLOB_LIMIT
    }
    return Intent(
        op_id=new_op_id(), op=plan.op, image=_display_path(image), dev=st.st_dev, ino=st.st_ino,
        old_length=plan.old_length, new_length=plan.new_length,
        old_root_digest=plan.old_root_digest, new_root_digest=plan.new_root_digest,
        appended=tuple(BlobPlacement(b.offset, b.source.size, b.source.digest) for b in plan.blobs),
        freed=plan.freed, before=plan.before, after=plan.after, small_blobs=small,
        job=job, host=os.uname().nodename, pid=os.getpid(), created=time.time(),
        extra={k: v for k, v in plan.extra.items() if isinstance(v, (str, int, float, bool, type(None)))},
        key=identity_key(fd), zeroed=plan.zeroed,
    )


def _display_path(image: str) -> str:
    """The image's path for the record (recovery re-checks the inode: never trusted)."""
    return os.path.abspath(image) if os.geteuid() == 0 else os.path.realpath(image)


def commit(image: str, fd: int, plan: CommitPlan, journal: Journal, *, job: str | None = None, io: FileIO = REAL_IO) -> Intent:
    """Run the whole protocol on the open, writable image `fd` (caller holds the lease)."""
    current = pread_all(fd, len(plan.before), 0)
    if current != plan.before:
        raise JournalError(image, "image metadata changed between planning and commit; nothing written")
    intent = make_intent(image, fd, plan, job=job)
    writer: EntryWriter = journal.begin(intent)
    try:
        write_blobs(fd, plan.blobs, io)
        io.fsync(fd)
        writer.mark(Kind.BLOBS_DURABLE, intent.op_id)
        with metadata_lock(fd, exclusive=True):  # :ro jobs parsing meanwhile see before or after
            io.pwrite(fd, plan.after, 0)  # the commit point
            io.fsync(fd)
            writer.mark(Kind.COMMITTED, intent.op_id)
            collect_garbage(fd, intent, io)
    except Exception:
        # An I/O error (ENOSPC, EIO...): finish or undo now, under the caller's lease,
        # so nothing stays half-written; if that fails too the entry waits for recover.
        writer.abandon()
        _recover_now(image, journal, io, fd)
        raise
    writer.finish()
    log.info("%s: %s committed (root index %s -> %s)", image, plan.op, plan.old_root_digest, plan.new_root_digest)
    return intent


def _recover_now(image: str, journal: Journal, io: FileIO, fd: int) -> None:
    from .recover import recover_image

    try:
        for outcome in recover_image(image, journal, io=io, image_fd=fd):
            log.warning("%s: after a failed %s: %s", image, outcome.op, outcome.outcome)
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        log.error("%s: immediate recovery failed (%s); run `sifoverlay recover`", image, exc)


def collect_garbage(fd: int, intent: Intent, io: FileIO) -> None:
    """Punch the bytes of freed objects that no live object overlaps, truncate trailing
    dead space, fsync. Idempotent; valid only once the after-image is committed."""
    live = live_ranges(intent.after)
    end = data_end(intent.after)
    for start, stop in dead_segments(intent.freed, live, end):
        io.punch_hole(fd, start, stop - start)
    for start, size in intent.zeroed:  # committed as zeros (compact): punching again is harmless
        io.punch_hole(fd, start, min(size, max(0, end - start)))
    if os.fstat(fd).st_size > end:
        io.truncate(fd, end)
    io.fsync(fd)


# --- recovery primitives (used by engine.recover) ------------------------------------------
def blend_of(current: bytes, before: bytes, after: bytes) -> bool:
    """Every byte equals the before- or the after-image (a torn commit write)."""
    if len(current) != len(before) or len(before) != len(after):
        return False
    if current in (before, after):
        return True
    return all(c == b or c == a for c, b, a in zip(current, before, after))


def appended_blobs_intact(fd: int, intent: Intent, io: FileIO) -> bool:
    """Each appended blob hashes to its digest; small ones are rewritten from the
    journal copy when they do not (they are ours: only dead space was there)."""
    size = os.fstat(fd).st_size
    for blob in intent.appended:
        if blob.end <= size and hash_file_range(fd, blob.offset, blob.size) == blob.digest:
            continue
        raw = intent.small_blobs.get(blob.digest)
        if raw is None or hashlib.sha256(raw).hexdigest() != blob.digest.split(":", 1)[1]:
            return False
        io.pwrite(fd, raw, blob.offset)
    return True


def roll_back(fd: int, intent: Intent, io: FileIO) -> None:
    """Restore the before-image and the old length (the appended tail goes away)."""
    if pread_all(fd, len(intent.before), 0) != intent.before:
        io.pwrite(fd, intent.before, 0)
    if os.fstat(fd).st_size > intent.old_length:
        io.truncate(fd, intent.old_length)
    io.fsync(fd)


def roll_forward(fd: int, intent: Intent, io: FileIO) -> None:
    """Make the after-image durable (blobs already verified)."""
    if pread_all(fd, len(intent.after), 0) != intent.after:
        io.pwrite(fd, intent.after, 0)
    io.fsync(fd)


@dataclass(frozen=True, slots=True)
class OpResult:
    """Outcome of create / seal."""

    action: str  # "created" | "sealed"
    image: str
    old_root_digest: str | None
    new_root_digest: str
    layer_digest: str
    layer_offset: int
    layer_size: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {
            "action": self.action, "image": self.image, "old_root_digest": self.old_root_digest,
            "new_root_digest": self.new_root_digest, "layer_digest": self.layer_digest,
            "layer_offset": self.layer_offset, "layer_size": self.layer_size, "seconds": round(self.seconds, 6),
        }
