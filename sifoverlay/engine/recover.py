"""Finish or roll back interrupted operations (crash-safety.md R5, R7).

Per entry, under the image's lease (R7: never while a live writer exists):
  * void (torn INTENT): the image was never touched -> entry removed ("nothing");
  * INTENT: metadata must still be the before-image -> truncate the appended tail
    ("rolled-back");
  * BLOBS_DURABLE: metadata is the before-image, the after-image or a torn mix of the
    two -> appended blobs verified (small ones rewritten from the journal) -> after-image
    written -> COMMITTED -> GC ("rolled-forward"); blobs unusable -> before-image
    restored ("rolled-back");
  * COMMITTED: metadata must be the after-image -> GC ("completed").
Metadata that matches none of these means someone else changed the image: the entry is
kept and the outcome is "failed" (nothing is overwritten). Every step is idempotent, so
recovery interrupted at any point is simply run again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from sifoverlay.errors import ImageBusy, RecoveryNeeded, SifOverlayError
from sifoverlay.fsio import REAL_IO, FileIO

from . import commit as protocol
from .journal import Entry, Journal, Kind

log = logging.getLogger(__name__)

LEASE_TTL = 60.0


@dataclass(frozen=True, slots=True)
class RecoverOutcome:
    image: str
    op: str | None
    outcome: str  # "rolled-forward" | "rolled-back" | "completed" | "nothing" | "failed"
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"image": self.image, "op": self.op, "outcome": self.outcome, "detail": self.detail}


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"


def temp_path(image: str, suffix: str, *, state_dir: str | None = None) -> str:
    """A scratch file in the state directory's scratch/ (never beside the image: its
    directory is the owner's), named ``<host>-<pid>.<random>.<suffix>`` so that
    `sweep_temp_files` can judge it."""
    import secrets

    from . import statedir

    directory = statedir.scratch_dir(state_dir)
    return os.path.join(directory, f"{_host()}-{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


@contextlib.contextmanager
def scratch_file(image: str, suffix: str, *, io: FileIO = REAL_IO, state_dir: str | None = None) -> Iterator[str]:
    """`temp_path`, removed afterwards. Only on success or an ordinary error: a simulated
    crash (BaseException) leaves it behind, as a real crash would, for `sweep_temp_files`."""
    from . import statedir

    path = temp_path(image, suffix, state_dir=state_dir)
    statedir.ensure(os.path.dirname(path), io=io, mode=0o700)
    try:
        yield path
    except Exception:
        if os.path.lexists(path):
            io.unlink(path)
        raise
    if os.path.lexists(path):
        io.unlink(path)


def sweep_temp_files(image: str | None = None, *, io: FileIO = REAL_IO, state_dir: str | None = None) -> list[str]:
    """Remove scratch files left by dead processes of this host (any image)."""
    from . import statedir

    directory = statedir.scratch_dir(state_dir)
    prefix = f"{_host()}-"
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for entry in names:
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix) :].split(".", 1)[0]
        if pid_text.isdigit() and (pid_alive(int(pid_text)) or int(pid_text) == os.getpid()):
            continue
        path = os.path.join(directory, entry)
        try:
            io.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with `pid` exists on this host (EPERM: yes, another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_gone(entry: Entry) -> bool:
    """The writer of a void (torn INTENT) entry is gone. Its op id names its host: on this
    host, by its pid; on another host (a shared journal directory) a pid says nothing, so
    by age: an INTENT is written in milliseconds, one older than a lease's ttl + grace
    belongs to a dead writer."""
    from .leasefile import DEFAULT_GRACE, DEFAULT_TTL

    parts = entry.op_id.split("-")
    if len(parts) >= 4 and parts[-3] != _host():
        import time

        return time.time() - entry.mtime > DEFAULT_TTL + DEFAULT_GRACE
    return entry.owner_pid is None or not pid_alive(entry.owner_pid)


def _open_for_recovery(image: str, intent_dev: int, intent_ino: int, io: FileIO) -> int:
    """The journalled image, opened checked (statedir.open_image_checked: no symlink, only
    a regular file, O_NONBLOCK) and verified to be the inode the journal recorded."""
    from . import statedir

    fd = statedir.open_image_checked(image, writable=True, io=io, expect_identity=(intent_dev, intent_ino))
    os.set_blocking(fd, True)
    return fd


def recover_entry(entry: Entry, journal: Journal, *, io: FileIO = REAL_IO, image_fd: int | None = None) -> RecoverOutcome:
    """Recover one entry; the caller holds the image's lease. `image_fd`: the caller's
    checked fd of the image (reopened writable through /proc/self/fd); else the journalled
    path is opened checked. Either way the inode must be the one the journal recorded."""
    from sifoverlay.errors import NotAuthorized

    from . import statedir

    intent = entry.intent
    if intent is None:
        journal.remove(entry)
        return RecoverOutcome("?", None, "nothing", f"void journal entry {os.path.basename(entry.path)} removed")
    image = intent.image
    try:
        if image_fd is not None:
            st = os.fstat(image_fd)
            if (st.st_dev, st.st_ino) != (intent.dev, intent.ino):
                return RecoverOutcome(image, intent.op, "failed", "image is not the journalled inode; entry kept")
            fd = statedir.reopen(image_fd, writable=True, io=io)
        else:
            fd = _open_for_recovery(image, intent.dev, intent.ino, io)
    except FileNotFoundError:
        return RecoverOutcome(image, intent.op, "failed", "image not found; journal entry kept")
    except NotAuthorized:
        return RecoverOutcome(image, intent.op, "failed", "image path now names another inode (renamed or replaced); "
                              "journal entry kept")
    except OSError as exc:
        return RecoverOutcome(image, intent.op, "failed", f"cannot open the image safely: {exc.strerror}; entry kept")
    try:
        current = protocol.pread_all(fd, len(intent.before), 0)
        state = entry.state
        if state == Kind.INTENT:
            if current != intent.before:
                return _changed(image, intent.op, "before-image")
            protocol.roll_back(fd, intent, io)
            outcome = "rolled-back"
        elif state == Kind.BLOBS_DURABLE:
            if not protocol.blend_of(current, intent.before, intent.after):
                return _changed(image, intent.op, "before- or after-image")
            if protocol.appended_blobs_intact(fd, intent, io):
                protocol.roll_forward(fd, intent, io)
                entry = journal.append(entry, Kind.COMMITTED)
                protocol.collect_garbage(fd, intent, io)
                outcome = "rolled-forward"
            else:
                protocol.roll_back(fd, intent, io)
                outcome = "rolled-back"
        else:
            if current != intent.after:
                return _changed(image, intent.op, "after-image")
            protocol.collect_garbage(fd, intent, io)
            outcome = "completed"
    finally:
        io.close(fd)
    journal.remove(entry)
    log.warning("%s: interrupted %s %s", image, intent.op, outcome)
    return RecoverOutcome(image, intent.op, outcome, f"{intent.op} {intent.op_id}: root index {intent.new_root_digest if outcome != 'rolled-back' else intent.old_root_digest}")


def _changed(image: str, op: str, what: str) -> RecoverOutcome:
    return RecoverOutcome(image, op, "failed", f"image metadata is not the journalled {what}: changed by someone else; entry kept")


def recover_image(image: str, journal: Journal, *, io: FileIO = REAL_IO, image_fd: int | None = None,
                  key: str | None = None) -> list[RecoverOutcome]:
    """Recover every pending entry of the image (caller holds the lease), oldest first.
    The image is named by `image_fd` (its identity key) or `key`, else by its path."""
    from . import statedir

    if key is None and image_fd is not None:
        key = statedir.identity_key(image_fd)
    entries = journal.pending(image, key=key)
    outcomes = [recover_entry(e, journal, io=io, image_fd=image_fd) for e in entries]
    sweep_temp_files(image, io=io)
    return outcomes


@contextlib.contextmanager
def exclusive(
    image: str, *, journal: Journal, job: str | None, source: str, io: FileIO = REAL_IO,
    region: tuple[int, int] | None = None, image_fd: int | None = None,
) -> Iterator[object | None]:
    """Hold the writer lease of `image` (or run inside the lease of `job`, which already
    holds it) and recover its unfinished entries first. Raises ImageBusy when someone
    else holds it, RecoveryNeeded when an entry cannot be recovered. `image_fd`: the
    caller's checked fd of the image; the lease and the recovery work on that inode."""
    from . import lease

    held = None
    current = lease.inspect(image, image_fd=image_fd)
    # Inside the job's own lease only when it was taken here (same host and boot): a job id
    # alone would let another node, or a later boot, write under a live holder's lease.
    if job is None or current is None or current.job_id != str(job) or not lease.held_here(current):
        holder = lease.Holder.current(job if job is not None else f"{source}-{os.getpid()}", source)
        held = lease.acquire(image, holder, ttl=LEASE_TTL, region=region if region is not None else (0, 0), io=io,
                             image_fd=image_fd)
    try:
        failed = [o for o in recover_image(image, journal, io=io, image_fd=image_fd) if o.outcome == "failed"]
        if failed:
            raise RecoveryNeeded(image, f"unfinished {failed[0].op} cannot be recovered: {failed[0].detail}")
        yield held
    finally:
        if held is not None:
            held.release()


def recover(
    paths: list[str] | None = None, *, journal_dir: str | os.PathLike[str] | None = None, io: FileIO = REAL_IO,
    grace: float | None = None,
) -> list[RecoverOutcome]:
    """Recover the given images (every image with pending entries when None). Each image
    is opened checked and must be the inode its entries recorded; one image that cannot
    be (a symlink, a FIFO, renamed, gone, busy) is reported `failed` and the pass goes on.
    The image's lease is taken first (R7); a holder on another host counts as gone only
    once its lease expired more than `grace` seconds ago (default: the engine's; the
    record's own announced grace if larger), whatever its pid says."""
    journal = Journal(journal_dir, io=io)
    outcomes: list[RecoverOutcome] = []
    targets: list[tuple[str, str | None]] = []  # (image, key)
    if paths is None:
        for entry in journal.pending():
            if entry.intent is not None:
                targets.append((entry.intent.image, entry.key))
            elif _writer_gone(entry):
                journal.remove(entry)  # torn INTENT of a dead writer: image never touched
                outcomes.append(RecoverOutcome("?", None, "nothing", f"void entry {os.path.basename(entry.path)} removed"))
        targets = list(dict.fromkeys(targets))
    else:
        targets = [(os.path.abspath(p) if os.geteuid() == 0 else os.path.realpath(p), None) for p in paths]
    for image, key in targets:
        try:
            outcomes += _recover_one(image, key, journal, io, grace)
        except Exception as exc:  # noqa: BLE001 - one bad image never aborts the pass
            log.exception("%s: recovery failed", image)
            outcomes.append(RecoverOutcome(image, None, "failed", f"{type(exc).__name__}: {exc}"))
    return outcomes


def _recover_one(image: str, key: str | None, journal: Journal, io: FileIO,
                 grace: float | None = None) -> list[RecoverOutcome]:
    from . import lease, statedir
    from .leasefile import DEFAULT_GRACE

    entries = journal.pending(key=key) if key is not None else None
    expect = None
    if entries:
        first = next((e.intent for e in entries if e.intent is not None), None)
        expect = (first.dev, first.ino) if first is not None else None
    try:
        fd = statedir.open_image_checked(image, expect_identity=expect)
    except FileNotFoundError:
        return [RecoverOutcome(image, None, "failed", "image not found")]
    except SifOverlayError as exc:
        return [RecoverOutcome(image, None, "failed", f"{exc.problem}; journal entry kept")]
    except OSError as exc:
        return [RecoverOutcome(image, None, "failed", f"cannot open the image safely: {exc.strerror}; journal entry kept")]
    try:
        key = statedir.identity_key(fd)
        if not journal.pending(key=key):  # nothing to do: no lease needed (a job may hold it)
            sweep_temp_files(image, io=io)
            _clear_dead_lease(image, fd, io)
            return [RecoverOutcome(image, None, "nothing", "no unfinished operation")]
        try:
            held = lease.acquire(image, lease.Holder.current(f"recover-{os.getpid()}", "recover"),
                                 ttl=LEASE_TTL, region=(0, 0), io=io, image_fd=fd,
                                 grace=DEFAULT_GRACE if grace is None else grace)
        except ImageBusy as exc:
            return [RecoverOutcome(image, None, "failed", f"busy: {exc.problem}")]
        try:
            found = recover_image(image, journal, io=io, image_fd=fd)
        except SifOverlayError as exc:
            found = [RecoverOutcome(image, None, "failed", exc.problem)]
        finally:
            held.release()
        return found or [RecoverOutcome(image, None, "nothing", "no unfinished operation")]
    finally:
        os.close(fd)


def _clear_dead_lease(image: str, fd: int, io: FileIO) -> None:
    """A killed writer's leftovers in our state directory: its writer lease when stale by
    the engine's rule (never a live one), and temp/tomb files of dead processes."""
    from . import lease
    from .leasefile import lease_path
    from .leasestale import sweep_temp_files as sweep_lease_temps

    try:
        lease.break_stale(image, image_fd=fd, io=io)
        target = lease_path(fd=fd)
        if os.path.isdir(os.path.dirname(target)):
            sweep_lease_temps(target, io=io)
    except OSError as exc:
        log.warning("%s: could not clear a dead lease: %s", image, exc)
