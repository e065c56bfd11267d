"""`overlay seal`: turn the overlay's upper/ into a squashfs layer replacing the ext3.

The ext3 is mounted read-only with fuse2fs (FUSE, not the kernel: the filesystem is user
bytes, and a corrupt ext3 must not reach the kernel's ext4 driver) at its offset inside
the SIF; `sifoverlay.upper.upper_to_squashfs` converts upper/ (kernel overlayfs and
fuse-overlayfs whiteout conventions) into a squashfs file beside the image; the commit
replaces the last layer (media type squashfs, digest = diff_id = sha256 of the file),
frees the ext3 object and GC punches its bytes (or truncates them when trailing).
A dirty ext3 is replayed + fsck'd first, as for sync.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from sifoverlay.errors import ExternalToolError, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .commit import BlobSource, OpResult, commit
from .journal import Journal
from .recover import exclusive, temp_path

log = logging.getLogger(__name__)


def _mount_ro(image: str, offset: int, mountpoint: str) -> None:
    from sifoverlay.ext3 import run_tool

    run_tool(["fuse2fs", "-o", f"ro,offset={offset}", image, mountpoint], path=image, timeout=120)


def _unmount(mountpoint: str) -> None:
    from sifoverlay.ext3 import run_tool

    for argv in (["fusermount3", "-u", mountpoint], ["fusermount", "-u", mountpoint], ["umount", mountpoint]):
        try:
            run_tool(argv, path=mountpoint, timeout=120)
            return
        except ExternalToolError as exc:
            last = exc
    raise last


def _to_squashfs(upper: str, out: str) -> None:
    from sifoverlay.upper import upper_to_squashfs

    upper_to_squashfs(upper, out)


def seal(
    path: str | os.PathLike[str],
    *,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    now: int | None = None,
) -> OpResult:
    from sifoverlay.ext3 import Superblock, hash_range, replay_and_fsck
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    from . import plan, quiesce

    start = time.monotonic()
    image = os.fspath(path)
    journal = Journal(journal_dir, io=io)
    with open_image(image) as img:
        if img.overlay is None:
            raise OverlayStateError(image, "image does not contain a writable overlay (last layer is not ext3)")
        region = (img.overlay.offset, img.overlay.size)
    quiesce.ensure_quiet(image, *region, writers_only=False)
    with exclusive(image, journal=journal, job=None, source="seal", io=io, region=region):
        with SifFile.open(image, writable=True, io=io) as sif:
            img = open_image(sif)
            overlay = img.overlay
            if overlay is None:
                raise OverlayStateError(image, "image does not contain a writable overlay (last layer is not ext3)")
            if Superblock.read(sif.fd, overlay.offset, size=overlay.size).is_dirty:
                replay_and_fsck(image, overlay.offset, overlay.size, io=io)
            scratch = temp_path(image, "sqfs")
            try:
                with tempfile.TemporaryDirectory(prefix=".sifoverlay-seal-") as mountpoint:
                    _mount_ro(image, overlay.offset, mountpoint)
                    try:
                        upper = os.path.join(mountpoint, "upper")
                        if not os.path.isdir(upper):
                            raise OverlayStateError(image, "overlay has no upper/ directory: nothing to seal")
                        _to_squashfs(upper, scratch)
                    finally:
                        _unmount(mountpoint)
                size = os.stat(scratch).st_size
                digest = hash_range(scratch, 0, size)
                planned = plan.plan_seal(img, squashfs=BlobSource(digest, size, path=scratch), now=now)
                commit(image, sif.fd, planned, journal, io=io)
            except Exception:
                if os.path.exists(scratch):
                    io.unlink(scratch)
                raise
            io.unlink(scratch)
    offset = next((b.offset for b in planned.blobs if b.source.digest == digest), -1)
    log.info("%s: sealed overlay into squashfs layer %s (%d bytes)", image, digest, size)
    return OpResult("sealed", image, planned.old_root_digest, planned.new_root_digest, digest, offset, size,
                    time.monotonic() - start)
