"""The operator's use of the engine: session records, reconcile, drift check.

The engine is imported inside each function: the operator's handlers load (and can report
a clean error) even on a node where an optional engine dependency is missing. The commit
itself goes through `fsio.io_from_env()`, which is REAL_IO unless the crash harness sets
SIFOVERLAY_CRASH_AT (tests/k8s/test_operator_crash.py kills the operator mid-commit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sifoverlay.errors import ImageBusy, OverlayStateError, RecoveryNeeded

log = logging.getLogger(__name__)
# The engine's state directory (lease records, scratch files: engine/statedir.py) is a
# process-wide setting; the operator needs the one on each image's volume, shared with the
# workload pods there. Engine calls with an explicit state directory are serialised.
_STATE_LOCK = threading.RLock()


@contextlib.contextmanager
def state(state_dir: str | None) -> Iterator[None]:
    """Run engine calls with `state_dir` as the engine's state directory (None: leave it)."""
    if state_dir is None:
        yield
        return
    from sifoverlay.engine import statedir

    with _STATE_LOCK, statedir.using(state_dir):
        yield


@dataclass(frozen=True, slots=True)
class ReconcileOutcome:
    action: str  # engine SyncResult.action: noop | reconciled | replayed-and-reconciled
    replayed: bool
    digest_before: str | None
    digest_after: str | None
    manifest_digest: str | None
    seconds: float
    sealed: bool = False


@dataclass(frozen=True, slots=True)
class DriftReport:
    state: str  # engine Status.state
    recorded: str | None
    actual: str | None


def manifest_digest(path: str, image_fd: int | None = None) -> str | None:
    """The image's manifest digest, read through `image_fd` (reopened read-only through
    /proc/self/fd) when given, else through a checked open of the path."""
    from sifoverlay.engine import statedir
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    fd = statedir.reopen(image_fd, writable=False) if image_fd is not None else statedir.open_image_checked(path)
    with open_image(SifFile.from_fd(fd, path)) as image:
        return str(image.manifest.digest)


def current_digests(path: str, journal_dir: str | None, *, state_dir: str | None = None,
                    image_fd: int | None = None,
                    expect_identity: tuple[int, int] | None = None) -> tuple[str | None, str | None]:
    """(overlay digest the manifest records, manifest digest) before the workload runs,
    read through `image_fd` (see `run`). Raises the engine's BadInput errors for a file
    that is not a usable OCI-SIF."""
    from sifoverlay import engine

    with state(state_dir):
        status = engine.status(path, verify=False, journal_dir=journal_dir,  # BadInput without an overlay
                               image_fd=image_fd, expect_identity=expect_identity)
    return status.recorded_digest, manifest_digest(path, image_fd)


def start_session(journal_dir: str | None, job_id: str, path: str, *, writable: bool) -> None:
    """Record the job in the journal (idempotent: a re-run handler finds it open)."""
    from sifoverlay.engine import journal, sessions

    directory = journal_dir or journal.default_journal_dir()
    if any(s.job_id == job_id for s in sessions.open_sessions(directory)):
        return
    sessions.start(directory, job_id, path, mode="rw" if writable else "ro", host=socket.gethostname(),
                   uid=0, source="k8s")


def finish_session(journal_dir: str | None, job_id: str, result: str) -> None:
    from sifoverlay.engine import journal, sessions

    directory = journal_dir or journal.default_journal_dir()
    if any(s.job_id == job_id for s in sessions.open_sessions(directory)):
        sessions.finish(directory, job_id, result)


def run(path: str, *, job_id: str, journal_dir: str | None, seal: bool,
        image_fd: int | None = None, expect_identity: tuple[int, int] | None = None,
        state_dir: str | None = None, who: Any = None) -> ReconcileOutcome:
    """engine.sync (which replays an interrupted commit of this image first); if the
    engine asks for a recovery it cannot do inline, run engine.recover and sync again.
    Running it twice is harmless: the second sync is a noop.

    `image_fd`/`expect_identity`: the descriptor and (st_dev, st_ino) of the image the
    operator resolved beneath the volume root without symlinks (safepath); sync, the
    recovery of an interrupted commit, seal and the manifest digest all work on that
    descriptor (reopened through /proc/self/fd), never on the path, which then only names
    the image in messages and journal records. Seal stages its squashfs in the engine's private scratch
    directory (root-owned, random names: engine.recover.scratch_file), never beside the
    image where the image's owner could swap it. `state_dir`: the engine's state directory
    on the image's volume (lease records shared with the workload pods). `who`: the
    revision each commit records (engine.history.Who; default: this workload, via the
    operator)."""
    from sifoverlay import engine
    from sifoverlay.engine.history import Who
    from sifoverlay.fsio import io_from_env

    if who is None:
        who = Who.current(via="operator", job_id=job_id)
    with state(state_dir):
        try:
            result = engine.sync(path, job=job_id, journal_dir=journal_dir, io=io_from_env(),
                                 image_fd=image_fd, expect_identity=expect_identity, who=who)
        except RecoveryNeeded:
            log.info("%s: recovering an interrupted commit before the reconcile", path)
            if image_fd is not None:
                _recover_by_fd(path, image_fd, journal_dir)
            else:
                engine.recover([path], journal_dir=journal_dir)
            result = engine.sync(path, job=job_id, journal_dir=journal_dir, io=io_from_env(),
                                 image_fd=image_fd, expect_identity=expect_identity, who=who)
        _release_job_lease(path, job_id, image_fd)
        if seal:
            engine.seal(path, journal_dir=journal_dir, image_fd=image_fd, expect_identity=expect_identity, who=who)
    return ReconcileOutcome(
        action=result.action, replayed=bool(result.replayed), digest_before=result.old_digest,
        digest_after=result.new_digest, manifest_digest=manifest_digest(path, image_fd), seconds=float(result.seconds),
        sealed=seal)


def _recover_by_fd(path: str, image_fd: int, journal_dir: str | None) -> None:
    """engine.recover for one image, on the operator's resolved descriptor: the journal
    entries of that inode (its identity key), under the image's writer lease taken on the
    same fd; the path is never re-resolved (a directory swapped in since cannot point the
    recovery at another image). An entry that still cannot be recovered is left to the
    sync that follows, which raises RecoveryNeeded again (retried by the handler)."""
    from sifoverlay.engine import lease
    from sifoverlay.engine.journal import Journal
    from sifoverlay.engine.recover import LEASE_TTL, recover_image
    from sifoverlay.fsio import io_from_env

    io = io_from_env()
    try:
        held = lease.acquire(path, lease.Holder.current(f"recover-{os.getpid()}", "recover"),
                             ttl=LEASE_TTL, region=(0, 0), io=io, image_fd=image_fd)
    except ImageBusy as exc:  # as engine.recover: reported, and the sync below decides
        log.warning("%s: recovery skipped: %s", path, exc.problem)
        return
    try:
        for outcome in recover_image(path, Journal(journal_dir, io=io), io=io, image_fd=image_fd):
            log.info("%s: recovery %s: %s", path, outcome.outcome, outcome.detail)
    finally:
        held.release()


def _release_job_lease(path: str, job_id: str, image_fd: int | None = None) -> None:
    """The workload pod (`sifoverlay exec --job-id`) or a killed operator may have
    left a file lease under this job's id; sync ran inside it. The job is over: drop it."""
    from sifoverlay.engine import lease

    leftover = lease.resume(None if image_fd is not None else path, job_id, image_fd=image_fd)
    if leftover is not None:
        log.info("%s: releasing the file lease left by job %s", path, job_id)
        leftover.release()


def from_termination_message(text: str, *, image: str) -> ReconcileOutcome:
    """The outcome a reconcile Job printed (`sifoverlay overlay sync --json`)."""
    try:
        data: dict[str, Any] = json.loads(text)
        return ReconcileOutcome(
            action=str(data["action"]), replayed=bool(data.get("replayed", False)),
            digest_before=data.get("old_digest"), digest_after=data.get("new_digest"),
            manifest_digest=data.get("manifest_digest"), seconds=float(data.get("seconds", 0.0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise OverlayStateError(image, f"reconcile Job printed no sync result ({exc}): {text[-200:]!r}") from None


def drift(path: str, journal_dir: str | None, *, state_dir: str | None = None, image_fd: int | None = None,
          expect_identity: tuple[int, int] | None = None) -> DriftReport:
    """Level-based drift check (engine.status: reads the superblock fingerprint only),
    through `image_fd` when given (see `run`)."""
    from sifoverlay import engine

    with state(state_dir):
        status = engine.status(path, verify=False, journal_dir=journal_dir, image_fd=image_fd,
                               expect_identity=expect_identity)
    return DriftReport(state=status.state, recorded=status.recorded_digest, actual=status.actual_digest)
