"""`sync`: make the OCI metadata of an image agree with its ext3 overlay bytes.

Fast path (no lease, no hashing, only header + table + JSON + superblock are read):
the superblock fingerprint equals the one recorded at the last reconcile and no journal
entry is pending -> nothing was mounted read-write since: "noop". A fingerprint that
changes on every rw mount and every e2fsprogs write makes this safe (ro mounts change
nothing); the one blind spot, raw writes that bypass the filesystem, is what
`force_hash=True` / `status --verify` are for.

Slow path: quiesce (no rw mount, loop device or lock) -> lease + recovery of unfinished
entries -> journal replay + e2fsck through a loop device if the ext3 is dirty ->
fingerprint taken AFTER fsck -> streaming hole-aware sha256 -> commit:
  * digest changed: descriptor extra, manifest layer, diff_id, fingerprint -> "reconciled";
  * digest equal but fingerprint changed (a rw mount that wrote nothing): only the
    fingerprint annotation is refreshed (manifest + index), so status returns to "clean"
    and the next sync is fast again -> action "noop", fingerprint_refreshed=True.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from sifoverlay.errors import NotAuthorized, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .journal import Journal

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
HEARTBEAT_EVERY = 20.0  # seconds between lease heartbeats while hashing


@dataclass(frozen=True, slots=True)
class SyncResult:
    action: str  # "noop" | "reconciled" | "replayed-and-reconciled"
    image: str
    old_digest: str
    new_digest: str
    bytes_hashed: int
    seconds: float
    replayed: bool
    fingerprint_refreshed: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "action": self.action, "image": self.image, "old_digest": self.old_digest,
            "new_digest": self.new_digest, "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 6), "replayed": self.replayed,
            "fingerprint_refreshed": self.fingerprint_refreshed,
        }


def _fast_noop(path: str, journal: Journal) -> str | None:
    """The recorded digest when the no-op path applies, else None."""
    from sifoverlay.errors import SifOverlayError
    from sifoverlay.ext3.superblock import Superblock
    from sifoverlay.ocisif import open_image

    if journal.pending(path):
        return None
    try:
        with open_image(path) as img:
            overlay = img.require_overlay()
            if overlay.fingerprint is None:
                return None
            sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
            if sb.is_dirty or sb.fingerprint() != overlay.fingerprint:
                return None
            return overlay.recorded_digest
    except OverlayStateError:
        raise
    except SifOverlayError:
        return None  # e.g. a commit in flight elsewhere: the slow path will sort it out


def sync(
    path: str | os.PathLike[str],
    *,
    job: str | None = None,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    progress: Progress | None = None,
    force_hash: bool = False,
    expect_identity: tuple[int, int] | None = None,
) -> SyncResult:
    """Reconcile the overlay's digest into descriptor, manifest, config and root index.

    `expect_identity` = (st_dev, st_ino) that root authorized earlier (Slurm Epilog): the
    file opened for writing must be that inode, so a rename or symlink swap of the path
    since the check cannot make root rewrite another image (NotAuthorized, nothing written).
    """
    start = time.monotonic()
    image = os.fspath(path)
    journal = Journal(journal_dir, io=io)
    if not force_hash:
        recorded = _fast_noop(image, journal)  # reads only: a swapped path cannot be harmed here
        if recorded is not None:
            return SyncResult("noop", image, recorded, recorded, 0, time.monotonic() - start, False)
    return _slow_sync(image, journal, job=job, io=io, progress=progress, force_hash=force_hash, start=start,
                      expect_identity=expect_identity)


def _slow_sync(
    image: str, journal: Journal, *, job: str | None, io: FileIO, progress: Progress | None,
    force_hash: bool, start: float, expect_identity: tuple[int, int] | None = None,
) -> SyncResult:
    from sifoverlay.ext3 import Superblock, check_region_header, hash_range, replay_and_fsck
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    from . import plan, quiesce
    from .commit import commit
    from .recover import exclusive

    with open_image(image) as img:  # locate the overlay for quiesce and the lock range
        located = img.require_overlay()
        region = (located.offset, located.size)
    quiesce.ensure_quiet(image, *region, job=job, writers_only=True)
    with exclusive(image, journal=journal, job=job, source="sync", io=io, region=region) as lease_held:
        with SifFile.open(image, writable=True, io=io) as sif:
            if expect_identity is not None and (sif.stat.st_dev, sif.stat.st_ino) != tuple(expect_identity):
                raise NotAuthorized(image, "was replaced since it was authorized (another inode): not reconciled")
            img = open_image(sif)
            overlay = img.require_overlay()
            replayed = False
            sb = Superblock.read(sif.fd, overlay.offset, size=overlay.size)
            if sb.is_dirty:
                # replay and/or e2fsck -p; fd= makes it check the loop device serves this inode
                replayed = replay_and_fsck(image, overlay.offset, overlay.size, fd=sif.fd, io=io).checked
                sb = Superblock.read(sif.fd, overlay.offset, size=overlay.size)  # fingerprint after fsck (§6)
            fingerprint = sb.fingerprint()
            old = overlay.recorded_digest
            if fingerprint == overlay.fingerprint and not force_hash and not replayed:
                return SyncResult("noop", image, old, old, 0, time.monotonic() - start, False)
            check_region_header(sif.fd, overlay.offset)
            new = hash_range(sif.fd, overlay.offset, overlay.size, progress=_with_heartbeat(progress, lease_held))
            planned = plan.plan_sync(img, new_digest=new, fingerprint=fingerprint)
            if planned is not None:
                commit(image, sif.fd, planned, journal, job=job, io=io)
    if new == old:
        action = "noop"
    else:
        action = "replayed-and-reconciled" if replayed else "reconciled"
    log.info("%s: sync %s (%s -> %s)", image, action, old, new)
    return SyncResult(action, image, old, new, overlay.size, time.monotonic() - start, replayed,
                      fingerprint_refreshed=(new == old and planned is not None))


def _with_heartbeat(progress: Progress | None, held: object | None) -> Progress | None:
    """Wrap the progress callback to heartbeat our lease during long hashes."""
    if held is None:
        return progress
    last = [time.monotonic()]

    def tick(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= HEARTBEAT_EVERY:
            last[0] = now
            held.heartbeat()  # type: ignore[attr-defined]
        if progress is not None:
            progress(done, total)

    return tick
