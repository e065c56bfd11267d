"""The frame the in-place overlay verbs (resize, compact, seal) share: the image opened and
checked, its overlay quiet, the writer lease held, a writable SifFile on the same inode,
and a dirty ext3 replayed before the verb looks at it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sifoverlay.errors import SifFormatError
from sifoverlay.fsio import FileIO

from .journal import Journal
from .recover import exclusive

if TYPE_CHECKING:
    from sifoverlay.ocisif.model import OciSifImage, Overlay
    from sifoverlay.sif.load import SifFile

__all__ = ["exclusive_overlay"]


@contextlib.contextmanager
def exclusive_overlay(
    image: str,
    *,
    source: str,
    journal: Journal,
    io: FileIO,
    image_fd: int | None,
    expect_identity: tuple[int, int] | None,
) -> Iterator[tuple[int, SifFile, OciSifImage, Overlay]]:
    """Yields (fd, writable sif, image model, overlay); `fd` is the checked read-only
    descriptor (closed on exit), `sif` a writable reopen of the same inode."""
    from sifoverlay.ext3 import Superblock, replay_and_fsck
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    from . import quiesce, statedir
    from .status import _checked_fd

    try:
        fd = _checked_fd(image, image_fd, expect_identity)
    except OSError as exc:
        raise SifFormatError(image, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
    try:
        with open_image(SifFile.from_fd(os.dup(fd), image)) as img:
            located = img.require_overlay()
            region = (located.offset, located.size)
        quiesce.ensure_quiet(image, *region, writers_only=False, fd=fd)
        with exclusive(image, journal=journal, job=None, source=source, io=io, region=region, image_fd=fd):
            with SifFile.from_fd(statedir.reopen(fd, writable=True, io=io), image) as sif:
                sif.writable = True
                img = open_image(sif)
                overlay = img.require_overlay()
                if Superblock.read(sif.fd, overlay.offset, size=overlay.size).is_dirty:
                    replay_and_fsck(image, overlay.offset, overlay.size, fd=sif.fd, io=io)
                yield fd, sif, img, overlay
    finally:
        os.close(fd)
