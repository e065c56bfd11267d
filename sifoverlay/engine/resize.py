"""`overlay resize`: grow (or shrink, never below the used space) the ext3 overlay.

Crash-safe by construction: the overlay region is copied (holes kept) into a scratch
file in the engine's state directory, resized there (e2fsck -f -p, resize2fs - as the
image's owner when root runs it), hashed, and committed like `create`: the resized copy is
appended as a new object, manifest layer / diff_id / fingerprint follow, and the old ext3
object is freed and punched after the commit point. A crash before the commit leaves the
old overlay exactly as it was; after it, the new one is complete. The price is a
temporary copy of the overlay's data (not of its holes) in the state directory, and the
object moves: the overlay is at a new offset afterwards (nothing in SingularityCE keeps
offsets; it looks the blob up by digest at every run).
"""

from __future__ import annotations

import logging
import os
import time

from sifoverlay.errors import OverlayStateError, UsageError
from sifoverlay.fsio import REAL_IO, FileIO

from .commit import BlobSource, OpResult, commit
from .history import Who, draft
from .journal import Journal
from .overlayop import exclusive_overlay
from .recover import scratch_file

log = logging.getLogger(__name__)

MIN_MIB = 64
SHRINK_MARGIN = 4 << 20  # bytes kept free when shrinking: resize2fs needs room for metadata


def _tool_user(st: os.stat_result) -> tuple[int, int] | None:
    """Who runs e2fsck/resize2fs: nobody else when we are not root; the image's owner when
    root runs it for a user's image; root only for root's own image."""
    if os.geteuid() != 0 or st.st_uid == 0 or st.st_gid == 0:
        return None
    return st.st_uid, st.st_gid


def resize(
    path: str | os.PathLike[str],
    *,
    size_mib: int,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    now: int | None = None,
    who: Who | None = None,
    image_fd: int | None = None,
    expect_identity: tuple[int, int] | None = None,
) -> OpResult:
    from sifoverlay.ext3 import Superblock, hash_range
    from sifoverlay.ext3.resize import copy_region, resize_fs

    from . import plan

    start = time.monotonic()
    image = os.fspath(path)
    if isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib < MIN_MIB:
        raise UsageError(image, f"overlay size must be at least {MIN_MIB} MiB, got {size_mib!r}")
    new_size = size_mib << 20
    journal = Journal(journal_dir, io=io)
    with exclusive_overlay(image, source="resize", journal=journal, io=io, image_fd=image_fd,
                           expect_identity=expect_identity) as (fd, sif, img, overlay):
        st = os.fstat(fd)
        sb = Superblock.read(sif.fd, overlay.offset, size=overlay.size)
        fs_bytes = sb.blocks_count * sb.block_size
        used = fs_bytes - sb.free_bytes
        if new_size == overlay.size and new_size == fs_bytes:
            return OpResult("unchanged", image, img.root_index.digest, img.root_index.digest,
                            overlay.recorded_digest, overlay.offset, overlay.size, time.monotonic() - start)
        if new_size < used + SHRINK_MARGIN:
            raise OverlayStateError(image, f"cannot shrink the overlay to {size_mib} MiB: {used} bytes are in "
                                    f"use (at least {(used + SHRINK_MARGIN + (1 << 20) - 1) >> 20} MiB needed)")
        with scratch_file(image, "ext3", io=io) as scratch:
            tmp = io.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                copy_region(sif.fd, overlay.offset, overlay.size, tmp, io)
                who_runs = _tool_user(st)
                if who_runs is not None:
                    os.fchown(tmp, *who_runs)  # io-seam: exempt (our scratch copy, handed to its owner's tools)
                new_sb = resize_fs(tmp, new_size, as_user=who_runs, io=io, name=image)
                io.fsync(tmp)
            finally:
                io.close(tmp)
            fingerprint = new_sb.fingerprint()
            digest = hash_range(scratch, 0, new_size)
            revision = draft("resize", who, old_overlay=overlay.recorded_digest, new_overlay=digest,
                             bytes_hashed=new_size, detail={"old_size": overlay.size, "new_size": new_size})
            planned = plan.plan_resize(img, ext3=BlobSource(digest, new_size, path=scratch),
                                       fingerprint=fingerprint, now=now, revision=revision)
            commit(image, sif.fd, planned, journal, io=io)
    offset = next(b.offset for b in planned.blobs if b.source.digest == digest)
    log.info("%s: overlay resized %d -> %d bytes (%s)", image, overlay.size, new_size, digest)
    return OpResult("resized", image, planned.old_root_digest, planned.new_root_digest, digest, offset, new_size,
                    time.monotonic() - start)
