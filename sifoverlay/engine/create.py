"""`overlay create`: add an empty ext3 overlay as the last layer of an OCI-SIF.

Shaped like `singularity overlay create` (ocisif-format §3.1): `mkfs.ext3 -d` with
upper/ (0755) and work/ (0700), >= 64 MiB, media type ...layer.v1.ext3, diff_id and an
empty history entry appended, config/manifest/index replaced - but through the journaled
commit protocol, with the fingerprint annotation recorded from the start.

Refusals (one line each): a native SIF (its overlay is a SIF partition, which
`singularity overlay create` already handles; we manage OCI-SIF overlays only), an image
with signatures (our new digests would invalidate them), an image that already has an
overlay, too few free descriptor slots (5 are needed: ext3, config, manifest, index, history).
upper/ and work/ are owned by the image file's owner, so a root-run create hands a
usable overlay to the user who owns the image.
"""

from __future__ import annotations

import logging
import os
import time

from sifoverlay.errors import CapacityError, NotAnOciSif, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .commit import BlobSource, OpResult, commit
from .history import Who, draft
from .journal import Journal
from .recover import exclusive, scratch_file

log = logging.getLogger(__name__)

SLOTS_NEEDED = 5  # = engine.capacity.SLOTS_NEEDED["create"]


def check_can_add_overlay(path: str) -> None:
    """All refusals that need no lock (re-checked under the lease by planning)."""
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.constants import DataType
    from sifoverlay.sif.load import SifFile

    with SifFile.open(path) as sif:
        if not any(d.datatype == DataType.OCI_ROOT_INDEX for d in sif.used()):
            raise NotAnOciSif(
                path,
                "native SIF, not an OCI-SIF: sifoverlay manages OCI-SIF overlays only "
                "(use `singularity overlay create` for a native overlay partition)",
            )
        if any(d.datatype == DataType.SIGNATURE for d in sif.used()):
            raise OverlayStateError(path, "image is signed: adding an overlay would invalidate its signatures")
        with open_image(sif) as img:
            if img.overlay is not None:
                raise OverlayStateError(path, f"image already has an overlay ({img.overlay.size} bytes at offset {img.overlay.offset})")
        free = sif.header.descriptors_free
        if free < SLOTS_NEEDED:
            raise CapacityError(
                path, f"needs {SLOTS_NEEDED} free descriptor slots to add an overlay, only {free} free",
                needed=SLOTS_NEEDED, free=free,
            )


def create_overlay(
    path: str | os.PathLike[str],
    *,
    size_mib: int = 64,
    sparse: bool = False,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    now: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    who: Who | None = None,
) -> OpResult:
    from sifoverlay.ext3 import Superblock, hash_range, make_overlay_fs
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    from . import plan

    from . import statedir

    start = time.monotonic()
    image = os.fspath(path)
    from sifoverlay.ext3 import MIN_OVERLAY_MIB  # (H2, issue 11) the size is checked before anything is staged
    from sifoverlay.errors import UsageError

    if isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib < MIN_OVERLAY_MIB:
        raise UsageError(image, f"overlay size must be at least {MIN_OVERLAY_MIB} MiB, got {size_mib!r}")
    journal = Journal(journal_dir, io=io)
    check_can_add_overlay(image)
    try:
        fd = statedir.open_image_checked(image)  # every step below works on this inode
    except OSError as exc:
        from sifoverlay.errors import SifFormatError

        raise SifFormatError(image, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
    try:
        st = os.fstat(fd)
        owner_uid = st.st_uid if uid is None else uid
        owner_gid = st.st_gid if gid is None else gid
        with exclusive(image, journal=journal, job=None, source="create", io=io, image_fd=fd):
            with scratch_file(image, "ext3", io=io) as scratch:
                make_overlay_fs(scratch, size_mib, sparse=sparse, uid=owner_uid, gid=owner_gid, io=io)
                size = os.stat(scratch).st_size
                fingerprint = Superblock.read(scratch, 0, size=size).fingerprint()
                digest = hash_range(scratch, 0, size)
                with SifFile.from_fd(statedir.reopen(fd, writable=True, io=io), image) as sif:
                    sif.writable = True
                    img = open_image(sif)
                    revision = draft("create", who, old_overlay=None, new_overlay=digest, bytes_hashed=size,
                                     detail={"size_mib": size_mib})
                    planned = plan.plan_create(img, ext3=BlobSource(digest, size, path=scratch, sparse=sparse),
                                               fingerprint=fingerprint, now=now, revision=revision)
                    commit(image, sif.fd, planned, journal, io=io)
    finally:
        os.close(fd)
    offset = next(b.offset for b in planned.blobs if b.source.digest == digest)
    log.info("%s: created a %d MiB overlay at offset %d (%s)", image, size_mib, offset, digest)
    return OpResult("created", image, planned.old_root_digest, planned.new_root_digest, digest, offset, size,
                    time.monotonic() - start)
