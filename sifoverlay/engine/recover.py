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

TEMP_MARK = ".sifoverlay-tmp-"
LEASE_TTL = 60.0


@dataclass(frozen=True, slots=True)
class RecoverOutcome:
    image: str
    op: str | None
    outcome: str  # "rolled-forward" | "rolled-back" | "completed" | "nothing" | "failed"
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"image": self.image, "op": self.op, "outcome": self.outcome, "detail": self.detail}


def _scratch_prefix(image: str) -> tuple[str, str]:
    """(directory, name prefix) of this host's scratch files for `image`."""
    directory, name = os.path.split(os.path.abspath(image))
    host = "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"
    return directory, f".{name}{TEMP_MARK}{host}-"


def temp_path(image: str, suffix: str) -> str:
    """A scratch file beside the image, named so `sweep_temp_files` can judge it."""
    directory, prefix = _scratch_prefix(image)
    return os.path.join(directory, f"{prefix}{os.getpid()}.{suffix}")


@contextlib.contextmanager
def scratch_file(image: str, suffix: str, *, io: FileIO = REAL_IO) -> Iterator[str]:
    """`temp_path`, removed afterwards. Only on success or an ordinary error: a simulated
    crash (BaseException) leaves it behind, as a real crash would, for `sweep_temp_files`."""
    path = temp_path(image, suffix)
    try:
        yield path
    except Exception:
        if os.path.exists(path):
            io.unlink(path)
        raise
    io.unlink(path)


def sweep_temp_files(image: str, *, io: FileIO = REAL_IO) -> list[str]:
    """Remove scratch files of `image` left by dead processes of this host."""
    directory, prefix = _scratch_prefix(image)
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for entry in names:
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix) :].split(".", 1)[0]
        if pid_text.isdigit() and pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
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


def recover_entry(entry: Entry, journal: Journal, *, io: FileIO = REAL_IO) -> RecoverOutcome:
    """Recover one entry; the caller holds the image's lease."""
    intent = entry.intent
    if intent is None:
        journal.remove(entry)
        return RecoverOutcome("?", None, "nothing", f"void journal entry {os.path.basename(entry.path)} removed")
    image = intent.image
    try:
        fd = io.open(image, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return RecoverOutcome(image, intent.op, "failed", "image not found; journal entry kept")
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


def recover_image(image: str, journal: Journal, *, io: FileIO = REAL_IO) -> list[RecoverOutcome]:
    """Recover every pending entry of `image` (caller holds the lease), oldest first."""
    outcomes = [recover_entry(e, journal, io=io) for e in journal.pending(image)]
    sweep_temp_files(image, io=io)
    return outcomes


@contextlib.contextmanager
def exclusive(
    image: str, *, journal: Journal, job: str | None, source: str, io: FileIO = REAL_IO,
    region: tuple[int, int] | None = None,
) -> Iterator[object | None]:
    """Hold the writer lease of `image` (or run inside the lease of `job`, which already
    holds it) and recover its unfinished entries first. Raises ImageBusy when someone
    else holds it, RecoveryNeeded when an entry cannot be recovered."""
    from . import lease

    held = None
    current = lease.inspect(image)
    if job is None or current is None or current.job_id != str(job):
        holder = lease.Holder.current(job if job is not None else f"{source}-{os.getpid()}", source)
        held = lease.acquire(image, holder, ttl=LEASE_TTL, region=region if region is not None else (0, 0), io=io)
    try:
        failed = [o for o in recover_image(image, journal, io=io) if o.outcome == "failed"]
        if failed:
            raise RecoveryNeeded(image, f"unfinished {failed[0].op} cannot be recovered: {failed[0].detail}")
        yield held
    finally:
        if held is not None:
            held.release()


def recover(
    paths: list[str] | None = None, *, journal_dir: str | os.PathLike[str] | None = None, io: FileIO = REAL_IO
) -> list[RecoverOutcome]:
    """Recover the given images (every image with pending entries when None)."""
    journal = Journal(journal_dir, io=io)
    outcomes: list[RecoverOutcome] = []
    if paths is None:
        images: list[str] = []
        for entry in journal.pending():
            if entry.intent is not None:
                images.append(entry.intent.image)
            elif entry.owner_pid is None or not pid_alive(entry.owner_pid):
                journal.remove(entry)  # torn INTENT of a dead writer: image never touched
                outcomes.append(RecoverOutcome("?", None, "nothing", f"void entry {os.path.basename(entry.path)} removed"))
        targets = list(dict.fromkeys(images))
    else:
        targets = [os.path.realpath(p) for p in paths]
    for image in targets:
        if not os.path.exists(image):
            outcomes.append(RecoverOutcome(image, None, "failed", "image not found"))
            continue
        if not journal.pending(image):  # nothing to do: no lease needed (a job may hold it)
            sweep_temp_files(image, io=io)
            outcomes.append(RecoverOutcome(image, None, "nothing", "no unfinished operation"))
            continue
        from . import lease

        try:
            held = lease.acquire(image, lease.Holder.current(f"recover-{os.getpid()}", "recover"),
                                 ttl=LEASE_TTL, region=(0, 0), io=io)
        except ImageBusy as exc:
            outcomes.append(RecoverOutcome(image, None, "failed", f"busy: {exc.problem}"))
            continue
        try:
            found = recover_image(image, journal, io=io)
        except SifOverlayError as exc:
            found = [RecoverOutcome(image, None, "failed", exc.problem)]
        finally:
            held.release()
        outcomes += found or [RecoverOutcome(image, None, "nothing", "no unfinished operation")]
    return outcomes
