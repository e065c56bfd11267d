"""`overlay status`: drift of the overlay against its recorded digest, without hashing
unless asked. Read-only: takes no lease and recovers nothing (pending journal entries
are counted; `sifoverlay recover` or any writing verb finishes them).

States:
  in-use    a live writer: lease holder, rw FUSE mount, rw loop device, write lock;
  clean     fingerprint unchanged since the last reconcile (and, when hashed, digest equal);
  modified  fingerprint changed since the last reconcile, not hashed: drift suspected;
  drift     hashed and different from the recorded digest;
  unknown   no fingerprint recorded (e.g. made or synced by SingularityCE) and not hashed.
Hashing: verify=True always, verify=None only when there is no fingerprint (the CLI
default), verify=False never (the library default: cheap enough for exporters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sifoverlay.errors import RecoveryNeeded, SifOverlayError


@dataclass(frozen=True, slots=True)
class Status:
    state: str
    image: str
    recorded_digest: str
    actual_digest: str | None
    fingerprint_recorded: dict[str, Any] | None
    fingerprint_now: dict[str, Any]
    overlay_size: int
    free_bytes: int
    holder: dict[str, Any] | None
    journal_pending: int
    overlay_offset: int = 0
    dirty: bool = False
    capacity: dict[str, Any] | None = None  # engine.capacity.Capacity.as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state, "image": self.image, "recorded_digest": self.recorded_digest,
            "actual_digest": self.actual_digest, "fingerprint_recorded": self.fingerprint_recorded,
            "fingerprint_now": self.fingerprint_now, "overlay_offset": self.overlay_offset,
            "overlay_size": self.overlay_size, "free_bytes": self.free_bytes, "dirty": self.dirty,
            "holder": self.holder, "journal_pending": self.journal_pending, "capacity": self.capacity,
        }


def status(
    path: str | os.PathLike[str],
    *,
    verify: bool | None = False,
    journal_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    image_fd: int | None = None,
    expect_identity: tuple[int, int] | None = None,
    remember: bool = False,
) -> Status:
    """Status of the overlay, read through one checked descriptor: the caller's `image_fd`
    (re-opened through /proc/self/fd) or the path opened with statedir.open_image_checked;
    `expect_identity` = (st_dev, st_ino) it must be (NotAuthorized otherwise).
    `remember`: leave the CLI's memo (engine/statusmemo.py) when the result may be told
    again from it (nothing hashed, no writer, nothing pending, no warning logged)."""
    from sifoverlay.ocisif import open_image

    from sifoverlay.sif.load import SifFile

    from . import statedir, statusmemo

    image = os.fspath(path)
    try:
        fd = _checked_fd(image, image_fd, expect_identity)
    except OSError as exc:
        from sifoverlay.errors import SifFormatError

        raise SifFormatError(image, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
    try:
        before = statusmemo.quiet_stamp(fd) if remember else None
        with _warnings_logged() as warned:
            pending = _pending(journal_dir, statedir.identity_key(fd))
            try:
                img = open_image(SifFile.from_fd(os.dup(fd), image))
            except SifOverlayError as exc:
                if pending:
                    raise RecoveryNeeded(image, f"unfinished operation in the journal ({exc.problem}); run `sifoverlay recover`") from exc
                raise
            with img:
                result = _status(image, fd, img, verify, progress, pending)
        if before is not None and not warned and result.actual_digest is None and result.holder is None \
                and result.journal_pending == 0:
            statusmemo.remember(fd, before, result.as_dict())
        return result
    finally:
        os.close(fd)


def _pending(journal_dir: str | os.PathLike[str] | None, key: str) -> int:
    """len(Journal(journal_dir).pending(key=key)); the journal module (and what it imports)
    is loaded only when an entry of the image is there by name (noopmemo's cheap listing)."""
    from . import noopmemo

    if not noopmemo.journal_has_entries(noopmemo.journal_directory(journal_dir), key):
        return 0
    from .journal import Journal

    return len(Journal(journal_dir).pending(key=key))


@contextmanager
def _warnings_logged() -> Iterator[list[logging.LogRecord]]:
    """The warnings (and worse) logged meanwhile: a status that warned leaves no memo, the
    memo's answer would not repeat the warning."""
    seen: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Catch(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield seen
    finally:
        root.removeHandler(handler)


def _status(image: str, fd: int, img: Any, verify: bool | None, progress: Callable[[int, int], None] | None,
            pending: int) -> Status:
    from sifoverlay.errors import ImageBusy
    from sifoverlay.ext3 import Superblock, hash_range

    from . import lease, quiesce
    from .capacity import capacity_of

    overlay = img.require_overlay()
    sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
    now = sb.fingerprint()
    busy = [a for a in quiesce.find_activity(image, overlay.offset, overlay.size, fd=fd) if a.writer]
    recorded_fp = overlay.fingerprint
    want_hash = verify is True or (verify is None and recorded_fp is None)
    actual = None
    holder = {"kind": busy[0].kind, "detail": busy[0].detail} if busy else None
    if want_hash and not busy:
        # Readers hold a lease too: no writer may change the bytes while they are hashed.
        try:
            shared = lease.acquire_shared(image, lease.Holder.current(f"status-{os.getpid()}", "status"),
                                          ttl=300.0, region=(overlay.offset, overlay.size), image_fd=fd)
        except ImageBusy as exc:
            busy_holder: dict[str, Any] = {"kind": "lease", "detail": exc.problem}
            holder = busy_holder
        else:
            with shared:
                actual = hash_range(img.sif.fd, overlay.offset, overlay.size, progress=progress)
    if busy or (want_hash and actual is None):
        state = "in-use"
    elif actual is not None:
        state = "clean" if actual == overlay.recorded_digest else "drift"
    elif recorded_fp is None:
        state = "unknown"
    else:
        state = "clean" if now == recorded_fp else "modified"
    return Status(
        state=state, image=image, recorded_digest=overlay.recorded_digest, actual_digest=actual,
        fingerprint_recorded=recorded_fp, fingerprint_now=now, overlay_size=overlay.size,
        free_bytes=sb.free_bytes, holder=holder, journal_pending=pending,
        overlay_offset=overlay.offset, dirty=sb.is_dirty, capacity=capacity_of(img).as_dict(),
    )


def _checked_fd(image: str, image_fd: int | None, expect_identity: tuple[int, int] | None) -> int:
    """A descriptor of the image for the engine's verbs: a /proc/self/fd reopen of the
    caller's `image_fd`, else a checked open of the path; verified against `expect_identity`."""
    from sifoverlay.errors import NotAuthorized

    from . import statedir

    if image_fd is None:
        return statedir.open_image_checked(image, expect_identity=expect_identity)
    fd = statedir.reopen(image_fd, writable=False)
    if expect_identity is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(expect_identity):
            os.close(fd)
            raise NotAuthorized(image, "the descriptor is not the authorized inode")
    return fd
