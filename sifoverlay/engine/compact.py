"""`overlay compact`: give the space of deleted files back to the filesystem the image
lives on.

Deleting a file inside the overlay frees its ext3 blocks but not the image file's
allocation. Compact reads the ext3 block bitmaps (ext3.resize.free_ranges: bounded reads,
nothing mounted), finds the free blocks that still hold allocated bytes, and commits the
digest of the region as it reads once those are zeros (one journaled commit, revision
"compact"); the punching (fallocate PUNCH_HOLE through fsio, zeros where unsupported) is
part of that commit's GC, after the commit point, listed in the journal entry (`zeroed`).

Free blocks are unreferenced by the filesystem, so its content is unchanged; only the
bytes - and therefore the digest - change. A crash before the commit point leaves every
byte as it was (old image); after it, recovery's GC finishes the punching (new image):
never a digest that the bytes do not have once recovery ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

from sifoverlay.fsio import REAL_IO, FileIO

from .history import Who, draft
from .journal import Journal
from .overlayop import exclusive_overlay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompactResult:
    action: str  # "compacted" | "noop"
    image: str
    old_digest: str
    new_digest: str
    punched_bytes: int
    blocks_before: int  # st_blocks (512-byte units) of the image file
    blocks_after: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {"action": self.action, "image": self.image, "old_digest": self.old_digest,
                "new_digest": self.new_digest, "punched_bytes": self.punched_bytes,
                "blocks_before": self.blocks_before, "blocks_after": self.blocks_after,
                "seconds": round(self.seconds, 6)}


PAGE = 4096


def _allocated(fd: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole file pages inside `ranges` (absolute) that hold data, not holes. Only
    whole pages: the overlay sits at an unaligned offset, and punching part of a page
    zeroes bytes without freeing anything (a second compact then finds nothing to do)."""
    from sifoverlay.ext3.resize import data_extents

    out = []
    for start, end in ranges:
        for s, n in data_extents(fd, start, end):
            lo, hi = -(-s // PAGE) * PAGE, (s + n) // PAGE * PAGE
            if hi > lo:
                out.append((lo, hi))
    return out


def compact(
    path: str | os.PathLike[str],
    *,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    who: Who | None = None,
    image_fd: int | None = None,
    expect_identity: tuple[int, int] | None = None,
) -> CompactResult:
    from sifoverlay.errors import Ext3FormatError
    from sifoverlay.ext3 import Superblock
    from sifoverlay.ext3.resize import free_ranges, hash_as_zeroed

    from . import plan
    from .commit import commit

    start = time.monotonic()
    image = os.fspath(path)
    journal = Journal(journal_dir, io=io)
    with exclusive_overlay(image, source="compact", journal=journal, io=io, image_fd=image_fd,
                           expect_identity=expect_identity) as (fd, sif, img, overlay):
        blocks_before = os.fstat(fd).st_blocks
        try:
            free = free_ranges(sif.fd, overlay.offset, overlay.size)
        except Ext3FormatError as exc:
            raise Ext3FormatError(image, f"ext3 overlay at offset {overlay.offset}: {exc.problem}") from None
        doomed = _allocated(sif.fd, [(overlay.offset + a, overlay.offset + b) for a, b in free])
        old = overlay.recorded_digest
        if not doomed:
            return CompactResult("noop", image, old, old, 0, blocks_before, blocks_before,
                                 time.monotonic() - start)
        # The digest of the bytes as they read once punched: the commit records it,
        # GC punches after the commit point (and recovery's GC redoes it after a crash).
        new = hash_as_zeroed(sif.fd, overlay.offset, overlay.size, doomed)
        punched = sum(b - a for a, b in doomed)
        sb = Superblock.read(sif.fd, overlay.offset, size=overlay.size)
        revision = draft("compact", who, old_overlay=old, new_overlay=new, bytes_hashed=overlay.size,
                         detail={"punched_bytes": punched})
        planned = plan.plan_sync(img, new_digest=new, fingerprint=sb.fingerprint(), revision=revision)
        if planned is None:  # the free blocks were zeros already: punching changes no byte
            for a, b in doomed:
                io.punch_hole(sif.fd, a, b - a)
            io.fsync(sif.fd)
        else:
            planned = dataclasses.replace(planned, op="compact", zeroed=tuple((a, b - a) for a, b in doomed))
            commit(image, sif.fd, planned, journal, io=io)
        blocks_after = os.fstat(fd).st_blocks  # the commit's GC punched the holes
    log.info("%s: compacted, %d bytes punched (%s -> %s)", image, punched, old, new)
    return CompactResult("compacted", image, old, new, punched, blocks_before, blocks_after, time.monotonic() - start)
