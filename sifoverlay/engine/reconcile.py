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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sifoverlay.errors import NotAuthorized, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .journal import Journal

if TYPE_CHECKING:
    from .history import Who

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
HEARTBEAT_EVERY = 20.0  # seconds between lease heartbeats while hashing
DEFAULT_SLACK = 64 << 20  # bytes an overlay region may exceed the ext3 it holds


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
    # seconds per step of a slow sync (quiesce, lock, replay, hash, commit): the Epilog's
    # timing record (slurm/phases.py) and bench/job_overhead.py read them
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "action": self.action, "image": self.image, "old_digest": self.old_digest,
            "new_digest": self.new_digest, "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 6), "replayed": self.replayed,
            "fingerprint_refreshed": self.fingerprint_refreshed,
        }


class HashDeadline(OverlayStateError):
    """Hashing ran past the caller's deadline (Slurm Epilog): nothing was committed, the
    session and lease stay for the sweeper, which has no deadline."""


def _fast_noop(fd: int, image: str, journal: Journal, *, remember: bool = False) -> str | None:
    """The recorded digest when the no-op path applies, else None. Reads through the
    caller's checked fd only. `remember`: leave the CLI's memo of this decision
    (engine/noopmemo.py)."""
    from sifoverlay.errors import SifOverlayError
    from sifoverlay.ext3.superblock import Superblock
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    from .statedir import identity_key

    key = identity_key(fd)
    if journal.pending(key=key):
        return None
    try:
        with open_image(SifFile.from_fd(os.dup(fd), image)) as img:
            overlay = img.require_overlay()
            if overlay.fingerprint is None:
                return None
            sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
            if sb.is_dirty or sb.fingerprint() != overlay.fingerprint:
                return None
            if remember:
                from . import noopmemo

                noopmemo.remember(fd, journal_dir=journal.directory, key=key, offset=overlay.offset,
                                  size=overlay.size, digest=overlay.recorded_digest)
            return overlay.recorded_digest
    except OverlayStateError:
        raise
    except SifOverlayError:
        return None  # e.g. a commit in flight elsewhere: the slow path will sort it out


def check_overlay_bounds(image: str, fd: int, *, max_bytes: int | None = None, slack: int = DEFAULT_SLACK) -> None:
    """Refuse work that costs more than it may (docs/security.md, bounded work): an overlay
    region larger than `max_bytes`, or larger than the ext3 it holds plus `slack` bytes
    (hashing reads holes as zeros: a sparse 16 TiB region costs hours of CPU). Reads
    only the SIF metadata and the superblock; raises OverlayStateError naming the sizes."""
    from sifoverlay.errors import Ext3FormatError
    from sifoverlay.ext3.superblock import Superblock
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    with open_image(SifFile.from_fd(os.dup(fd), image)) as img:
        overlay = img.overlay
        if overlay is None:
            return
        if max_bytes is not None and overlay.size > max_bytes:
            raise OverlayStateError(image, f"overlay is {overlay.size} bytes, more than the configured limit "
                                    f"of {max_bytes} bytes (max_overlay)")
        try:
            sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
        except Ext3FormatError as exc:  # name the image, not the fd
            raise Ext3FormatError(image, f"ext3 overlay at offset {overlay.offset}: {exc.problem}") from None
        fs_bytes = int(sb.blocks_count) * int(sb.block_size)
        if overlay.size > fs_bytes + slack:
            raise OverlayStateError(image, f"overlay region is {overlay.size} bytes but its ext3 is only {fs_bytes} "
                                    f"bytes: refused (more than {slack} bytes of slack)")


def sync(
    path: str | os.PathLike[str],
    *,
    job: str | None = None,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    progress: Progress | None = None,
    force_hash: bool = False,
    expect_identity: tuple[int, int] | None = None,
    image_fd: int | None = None,
    deadline: float | None = None,
    max_bytes: int | None = None,
    as_user: tuple[int, int] | None = None,
    who: Who | None = None,
    op: str = "sync",
    remember_noop: bool = False,
) -> SyncResult:
    """Reconcile the overlay's digest into descriptor, manifest, config and root index.

    Every step works on one checked descriptor of the image (docs/security.md): the
    caller's `image_fd` (root's authorized fd; reopened writable through /proc/self/fd,
    never by path), else the path opened once with statedir.open_image_checked (no
    symlink, O_NONBLOCK, regular file only). `expect_identity` = (st_dev, st_ino) that
    root authorized earlier (Slurm Epilog): the descriptor must be that inode, so a
    rename or symlink swap of the path cannot make root touch another image
    (NotAuthorized, nothing written). `deadline` (time.monotonic() value): hashing stops
    with HashDeadline past it, nothing committed. `max_bytes`: check_overlay_bounds
    before any hashing. `as_user` = (uid, gid) of the job user: a dirty ext3 is replayed
    by an unprivileged process of that user (ext3.replay_and_fsck), and quiesce trusts
    that uid's FUSE mounts besides root's and the owner's. `who` / `op`: the revision the
    commit records (engine.history; default: the calling process, op "sync").
    `remember_noop`: a fast no-op leaves the memo that lets the next CLI sync answer
    without loading the engine (engine/noopmemo.py; the CLI's own state directory).
    """
    from . import statedir

    start = time.monotonic()
    image = os.fspath(path)
    journal = Journal(journal_dir, io=io)
    if image_fd is not None:
        fd = statedir.reopen(image_fd, writable=False)
        if expect_identity is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != tuple(expect_identity):
                os.close(fd)
                raise NotAuthorized(image, "the descriptor is not the authorized inode: not reconciled")
    else:
        try:
            fd = statedir.open_image_checked(image, expect_identity=expect_identity)
        except OSError as exc:
            from sifoverlay.errors import SifFormatError

            raise SifFormatError(image, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
    try:
        if not force_hash:
            recorded = _fast_noop(fd, image, journal, remember=remember_noop)
            if recorded is not None:
                return SyncResult("noop", image, recorded, recorded, 0, time.monotonic() - start, False)
        check_overlay_bounds(image, fd, max_bytes=max_bytes)
        return _slow_sync(image, fd, journal, job=job, io=io, progress=progress, force_hash=force_hash, start=start,
                          deadline=deadline, as_user=as_user, who=who, op=op)
    finally:
        os.close(fd)


def _slow_sync(
    image: str, fd: int, journal: Journal, *, job: str | None, io: FileIO, progress: Progress | None,
    force_hash: bool, start: float, deadline: float | None = None, as_user: tuple[int, int] | None = None,
    who: Who | None = None, op: str = "sync",
) -> SyncResult:
    from sifoverlay.ext3 import Superblock, check_region_header, hash_range
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    from . import plan, quiesce, statedir
    from .commit import commit
    from .history import draft
    from .recover import exclusive

    with open_image(SifFile.from_fd(os.dup(fd), image)) as img:  # locate the overlay for quiesce and the lock range
        located = img.require_overlay()
        region = (located.offset, located.size)
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = phases.get(name, 0.0) + now - mark
        mark = now

    quiesce.ensure_quiet(image, *region, job=job, writers_only=True, fd=fd,
                         owners=None if as_user is None else (as_user[0],))
    lap("quiesce")
    with exclusive(image, journal=journal, job=job, source="sync", io=io, region=region, image_fd=fd) as lease_held:
        lap("lock")
        wfd = statedir.reopen(fd, writable=True, io=io)
        with SifFile.from_fd(wfd, image) as sif:
            sif.writable = True
            img = open_image(sif)
            overlay = img.require_overlay()
            replayed = False
            sb = Superblock.read(sif.fd, overlay.offset, size=overlay.size)
            if sb.is_dirty:
                from sifoverlay.ext3 import replay_and_fsck  # subprocess & co only when there is a replay

                # replay and/or e2fsck -p; fd= makes it check the loop device serves this inode
                replayed = replay_and_fsck(image, overlay.offset, overlay.size, fd=sif.fd, io=io,
                                           as_user=as_user).checked
                sb = Superblock.read(sif.fd, overlay.offset, size=overlay.size)  # fingerprint after fsck (§6)
            fingerprint = sb.fingerprint()
            old = overlay.recorded_digest
            lap("replay")
            if fingerprint == overlay.fingerprint and not force_hash and not replayed:
                return SyncResult("noop", image, old, old, 0, time.monotonic() - start, False, phases=phases)
            check_region_header(sif.fd, overlay.offset)
            new = hash_range(sif.fd, overlay.offset, overlay.size,
                             progress=_with_deadline(_with_heartbeat(progress, lease_held), deadline, image))
            lap("hash")
            revision = draft(op, who, old_overlay=old, new_overlay=new, bytes_hashed=overlay.size,
                             detail={"replayed": True} if replayed else None)
            planned = plan.plan_sync(img, new_digest=new, fingerprint=fingerprint, revision=revision)
            if planned is not None:
                commit(image, sif.fd, planned, journal, job=job, io=io)
    lap("commit")
    if new == old:
        action = "noop"
    else:
        action = "replayed-and-reconciled" if replayed else "reconciled"
    log.info("%s: sync %s (%s -> %s)", image, action, old, new)
    return SyncResult(action, image, old, new, overlay.size, time.monotonic() - start, replayed,
                      fingerprint_refreshed=(new == old and planned is not None), phases=phases)


def _with_deadline(progress: Progress | None, deadline: float | None, image: str) -> Progress | None:
    if deadline is None:
        return progress

    def tick(done: int, total: int) -> None:
        if time.monotonic() > deadline:
            raise HashDeadline(image, f"hashing stopped after {done} of {total} bytes: past the deadline "
                               "(left for the sweeper)")
        if progress is not None:
            progress(done, total)

    return tick


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
