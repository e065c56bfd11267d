"""Finish the `sifoverlay exec` runs of this host that died without cleaning up (SIGKILL,
OOM kill, power loss of the session's terminal): `sifoverlay recover` calls this.

An exec's job processes die with it (enter.py: pid namespace + PR_SET_PDEATHSIG), but its
mounts and FUSE daemons - started in their own sessions so that a Ctrl-C cannot cut the
ext3 short - stay, as do its session record and lease. For every open session of source
"cli" on this host whose exec process is gone (pid + /proc start time + boot id, so a
recycled pid is not mistaken for it):

  1. teardown of its runtime directory: unmount, wait for / stop the FUSE daemons (fuse2fs
     writes the superblock back when it exits);
  2. rw: engine.sync inside the dead run's lease (job=), as the Epilog does;
  3. release that lease, close the session.

Nothing waits for the lease TTL: the holder is known dead, and the lease is released by
its owner's job id, not broken.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

from sifoverlay.errors import SifOverlayError
from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReclaimOutcome:
    job_id: str
    image: str
    result: str  # "released" | "noop" | "reconciled" | "image-missing" | "failed"
    step: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def exec_is_dead(session: Any) -> bool:
    """Is the `sifoverlay exec` process that opened `session` gone for good?"""
    from sifoverlay.engine.procs import boot_id, process_alive

    details = session.details or {}
    booted = details.get("boot_id")
    if booted is not None and booted != boot_id():
        return True  # another boot: nothing of that run is alive
    started = details.get("pid_start")
    return not process_alive(session.pid, int(started) if started is not None else None)


def dead_exec_sessions(journal_dir: str, *, host: str | None = None) -> list[Any]:
    from sifoverlay.engine import sessions

    here = host or socket.gethostname()
    return [s for s in sessions.open_sessions(journal_dir) if s.source == "cli" and s.host == here and exec_is_dead(s)]


def reclaim(journal_dir: str, *, host: str | None = None, io: FileIO = REAL_IO) -> list[ReclaimOutcome]:
    """Clean up every dead exec run of this host recorded in `journal_dir`."""
    return [reclaim_session(s, journal_dir, io) for s in dead_exec_sessions(journal_dir, host=host)]


def reclaim_session(session: Any, journal_dir: str, io: FileIO) -> ReclaimOutcome:
    from sifoverlay import engine
    from sifoverlay.engine import lease, sessions

    from .assemble import teardown

    job = session.job_id
    step = "teardown"
    try:
        base = session.details.get("base_dir")
        if base:
            report = teardown(job, base_dir=str(base), io=io)
            log.info("exec %s: %d unmounted, %d daemons stopped", job, len(report.unmounted), len(report.signalled))
        result = "released"
        if not os.path.lexists(session.image):
            result = "image-missing"
        elif session.mode == "rw":
            step = "sync"
            synced = engine.sync(session.image, job=job, journal_dir=journal_dir, io=io)
            result = "noop" if synced.action == "noop" else "reconciled"
        step = "release"
        held = lease.resume(session.image, job, io=io) if result != "image-missing" else None
        if held is not None:
            held.release()
        step = "session"
        sessions.finish(journal_dir, job, f"recovered after the exec died: {result}", io=io)
        log.info("exec %s on %s: %s", job, session.image, result)
        return ReclaimOutcome(job, session.image, result, step)
    except SifOverlayError as exc:
        log.error("exec %s on %s: %s failed: %s", job, session.image, step, exc)
        return ReclaimOutcome(job, session.image, "failed", step, exc.message())
