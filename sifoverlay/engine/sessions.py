"""Job session records: one durable JSON file per running job in ``<journal_dir>/sessions/``.

A session is written when a job starts using an image (Slurm Prolog, Kubernetes pod,
`sifoverlay exec`) and removed when the job's end has been handled (unmounted,
reconciled, lease released). Whatever is left in the directory is work for the sweeper
(crash-safety.md R10: keyed by job id, liveness decided from Slurm/K8s state).

Files are named ``<job_id>.json`` (the job id restricted to a safe character set), or
``<job_id>@<host>.json`` for a per-host session (`start(per_host=True)`: Slurm, where
every node of a multi-node job has its own mounts and lease and one shared journal
directory serves all nodes), and written with `FileIO.write_file_atomic` (temp + fsync + rename + directory fsync), so a
reader sees either no record or a whole one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sifoverlay.errors import JournalError, UsageError
from sifoverlay.fsio import REAL_IO, FileIO

__all__ = ["Session", "amend", "finish", "load", "open_sessions", "session_path", "sessions_dir", "start"]

log = logging.getLogger(__name__)

SESSIONS_SUBDIR = "sessions"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}$")
_MODES = ("rw", "ro")


@dataclass(frozen=True, slots=True)
class Session:
    """One job's use of one image."""

    job_id: str
    image: str
    mode: str  # "rw" | "ro"
    host: str
    uid: int
    source: str  # "slurm" | "k8s" | "cli"
    started: float
    pid: int
    details: dict[str, Any] = field(default_factory=dict)
    finished: float | None = None
    result: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"version": 1, **asdict(self)}, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, path: str) -> Session:
        try:
            data = json.loads(raw)
            return cls(
                job_id=str(data["job_id"]), image=str(data["image"]), mode=str(data["mode"]),
                host=str(data["host"]), uid=int(data["uid"]), source=str(data["source"]),
                started=float(data["started"]), pid=int(data.get("pid", 0)),
                details=dict(data.get("details") or {}), finished=data.get("finished"),
                result=data.get("result"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(path, f"unreadable session record: {exc}") from None


def sessions_dir(journal_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(journal_dir), SESSIONS_SUBDIR)


def session_path(journal_dir: str | os.PathLike[str], job_id: str, *, host: str | None = None) -> str:
    """``<job>.json``, or ``<job>@<host>.json`` for a per-host session."""
    job = str(job_id)
    if not _JOB_ID.match(job):
        raise UsageError(None, f"job id {job!r} is not usable as a session name (allowed: letters, digits, ._:@+-)")
    if host is None:
        return os.path.join(sessions_dir(journal_dir), f"{job}.json")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in host)[:64] or "host"
    return os.path.join(sessions_dir(journal_dir), f"{job}@{safe}.json")


def _find(journal_dir: str | os.PathLike[str], job_id: str, host: str | None) -> tuple[str, Session] | None:
    """The open session of `job_id` and its file. `host` given: that host's per-host
    session, else a plain one of that host. None: the plain one, else a per-host one
    (this host's first)."""
    import socket

    plain = session_path(journal_dir, job_id)
    candidates = [session_path(journal_dir, job_id, host=host), plain] if host is not None else [plain]
    if host is None:
        here = session_path(journal_dir, job_id, host=socket.gethostname())
        prefix = f"{job_id}@"
        try:
            names = sorted(n for n in os.listdir(sessions_dir(journal_dir))
                           if n.startswith(prefix) and n.endswith(".json"))
        except FileNotFoundError:
            names = []
        candidates += [here] + [os.path.join(sessions_dir(journal_dir), n) for n in names]
    for path in candidates:
        try:
            session = Session.from_json(_read_regular(path), path)
        except FileNotFoundError:
            continue
        if host is not None and path == plain and session.host != host:
            continue
        return path, session
    return None


def start(
    journal_dir: str | os.PathLike[str],
    job_id: str,
    image: str | os.PathLike[str],
    *,
    mode: str,
    host: str,
    uid: int,
    source: str,
    details: dict[str, Any] | None = None,
    io: FileIO = REAL_IO,
    per_host: bool = False,
) -> Session:
    """Durably record that `job_id` uses `image`. A requeued job (same id, same image)
    replaces its old record; an open session of the same id on another image is refused.
    `per_host`: one record per (job, host) (see the module docstring)."""
    if mode not in _MODES:
        raise UsageError(None, f"session mode must be one of {', '.join(_MODES)}, not {mode!r}")
    path = session_path(journal_dir, job_id, host=host if per_host else None)
    image_path = os.path.abspath(os.fspath(image))
    existing = load(journal_dir, job_id, host=host if per_host else None)
    if existing is not None:
        if existing.image != image_path:
            raise JournalError(path, f"job {job_id} already has an open session on {existing.image}")
        log.info("job %s: replacing its open session on %s (requeue)", job_id, image_path)
    session = Session(
        job_id=str(job_id), image=image_path, mode=mode, host=host, uid=int(uid), source=source,
        started=time.time(), pid=os.getpid(), details=dict(details or {}),
    )
    io.makedirs(sessions_dir(journal_dir), 0o755)
    io.write_file_atomic(path, session.to_json(), mode=0o644)
    return session


def finish(journal_dir: str | os.PathLike[str], job_id: str, result: str, *, io: FileIO = REAL_IO,
           host: str | None = None) -> Session | None:
    """Close the session of `job_id` (on `host`, see `load`): its record is removed
    (durably) and returned with `finished`/`result` filled in. None (not an error) when
    there is no open session, so an Epilog and a sweeper may both call it."""
    found = _find(journal_dir, job_id, host)
    if found is None:
        return None
    path, session = found
    try:
        io.unlink(path)
    except FileNotFoundError:
        return None  # someone else finished it between our read and our unlink
    io.fsync_dir(sessions_dir(journal_dir))
    log.info("job %s: session on %s finished: %s", job_id, session.image, result)
    return Session(**{**_fields(session), "finished": time.time(), "result": str(result)})


def amend(journal_dir: str | os.PathLike[str], job_id: str, details: dict[str, Any], *, io: FileIO = REAL_IO,
          host: str | None = None) -> Session | None:
    """Merge `details` into the open session of `job_id` (on `host`), durably (same atomic
    write as `start`): e.g. the Epilog's "reconcile pending" mark before it hands the hash
    to a worker. None when there is no open session."""
    found = _find(journal_dir, job_id, host)
    if found is None:
        return None
    path, session = found
    amended = Session(**{**_fields(session), "details": {**session.details, **details}})
    io.write_file_atomic(path, amended.to_json(), mode=0o644)
    return amended


def load(journal_dir: str | os.PathLike[str], job_id: str, *, host: str | None = None) -> Session | None:
    """The open session of `job_id`; with `host`, the one of that host (see `_find`)."""
    found = _find(journal_dir, job_id, host)
    return None if found is None else found[1]


def _read_regular(path: str) -> bytes:
    """The bytes of a regular file, opened O_NOFOLLOW|O_NONBLOCK (fsio.open_regular): a
    FIFO or symlink in the sessions directory is refused, never waited on or followed."""
    from sifoverlay.fsio import open_regular

    try:
        fd = open_regular(path, os.O_RDONLY)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise JournalError(path, f"unreadable session record: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def open_sessions(journal_dir: str | os.PathLike[str]) -> list[Session]:
    """Every session not yet finished, oldest first. Unreadable records are logged and
    skipped (temp files of an interrupted write are ignored)."""
    directory = sessions_dir(journal_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            found.append(Session.from_json(_read_regular(path), path))
        except FileNotFoundError:
            continue
        except JournalError as exc:
            log.error("%s", exc)
    return sorted(found, key=lambda s: (s.started, s.job_id))


def _fields(session: Session) -> dict[str, Any]:
    return {name: getattr(session, name) for name in session.__dataclass_fields__}
