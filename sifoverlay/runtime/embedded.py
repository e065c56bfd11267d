"""Embedded single-machine mode (`sifoverlay exec`): lease, session, assemble, run,
teardown, reconcile, release - no scheduler involved.

Order, and why:
  1. open the image once (O_NOFOLLOW), validate it, take the lease through that fd
     (writer lease for --writable, reader lease otherwise) and journal the session;
  2. assemble, run the command, tear down (always, also when the command fails);
  3. --writable: drop our byte-range lock (engine.sync's quiesce would see it), then
     `engine.sync(image, job=<our job id>)` reconciles under our lease;
  4. close the session and release the lease. A failed sync leaves the session open for
     `sifoverlay recover` and is reported, but the command's exit code is returned.
While the command runs, a thread heartbeats the lease every ttl/3 seconds so other
nodes never judge it stale.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sifoverlay.errors import BadInput, NotAuthorized, SifOverlayError
from sifoverlay.fsio import REAL_IO, FileIO

from .assemble import assemble, teardown
from .execute import Bind, StartError, exec_in

if TYPE_CHECKING:
    from sifoverlay.engine.lease import Lease

log = logging.getLogger(__name__)

DEFAULT_BASE_DIR = "/run/sifoverlay/jobs"
ENV_BASE_DIR = "SIFOVERLAY_RUNTIME_DIR"
DEFAULT_LEASE_TTL = 60.0


def default_base_dir() -> str:
    """$SIFOVERLAY_RUNTIME_DIR, else /run/sifoverlay/jobs for root, else the user's own
    (runtime.state.user_base_dir: unprivileged exec)."""
    if os.environ.get(ENV_BASE_DIR):
        return os.path.abspath(os.environ[ENV_BASE_DIR])
    if os.geteuid() != 0:
        from .state import user_base_dir

        return user_base_dir()
    return DEFAULT_BASE_DIR


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ExecOutcome:
    returncode: int
    job_id: str
    sync_action: str | None  # "noop" | "reconciled" | ... | None (ro, skipped, failed)
    sync_error: str | None


def run_embedded(
    image: str, argv: Sequence[str], *, user: User, writable: bool, mode: str = "fuse",
    binds: Sequence[Bind] = (), cwd: str | None = None, env: Mapping[str, str] | None = None,
    job_id: str | None = None, base_dir: str | None = None, journal_dir: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL, lease_wait: float | None = None, sync: bool = True,
    io: FileIO = REAL_IO,
) -> ExecOutcome:
    from sifoverlay.engine import lease, sessions
    from sifoverlay.engine.procs import boot_id, process_start_ticks
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    path = os.path.abspath(image)
    host = socket.gethostname()
    job = job_id or f"exec-{host}-{os.getpid()}"
    base = os.path.abspath(base_dir) if base_dir else default_base_dir()
    journal = journal_dir or _default_journal_dir()
    from sifoverlay.engine import statedir

    try:  # one checked fd for every step (no symlink, O_NONBLOCK, regular file): docs/security.md
        fd = statedir.open_image_checked(path)
    except OSError as exc:
        from sifoverlay.errors import SifFormatError

        raise SifFormatError(path, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
    os.set_blocking(fd, True)
    try:
        with SifFile.from_fd(os.dup(fd), path) as sif, open_image(sif) as img:
            region = (img.overlay.offset, img.overlay.size) if img.overlay is not None else (0, 0)
        take = lease.acquire if writable else lease.acquire_shared
        held = take(path, lease.Holder.current(job, "cli"), ttl=lease_ttl, wait=lease_wait, region=region,
                    image_fd=fd, io=io)
        try:
            sessions.start(journal, job, path, mode="rw" if writable else "ro", host=host, uid=user.uid,
                           source="cli", details={"lease_token": held.token, "base_dir": base,
                                                  "pid_start": process_start_ticks(os.getpid()), "boot_id": boot_id()},
                           io=io)
            returncode, failure = _assemble_and_run(path, job, argv, user=user, writable=writable, mode=mode,
                                                    binds=binds, cwd=cwd, env=env, base=base, fd=fd, held=held,
                                                    lease_ttl=lease_ttl, io=io)
            action, error = (None, None)
            # Also after a failed start (a rw mount may have touched the ext3), unless the
            # image was refused before anything was mounted.
            # The byte-range lock stays held through the sync (quiesce ignores this
            # process's own lock for `job`): SingularityCE cannot slip in meanwhile.
            if writable and sync and not isinstance(failure, (BadInput, NotAuthorized)):
                action, error = _reconcile(path, job, journal, io, fd)
            if error is None:
                result = f"exit {returncode}" if failure is None else f"not started: {failure.message()}"
                sessions.finish(journal, job, result + (f", sync {action}" if action else ""), io=io)
            if failure is not None:
                raise failure
        finally:
            held.release()
    finally:
        os.close(fd)
    return ExecOutcome(returncode, job, action, error)


def _assemble_and_run(
    path: str, job: str, argv: Sequence[str], *, user: User, writable: bool, mode: str, binds: Sequence[Bind],
    cwd: str | None, env: Mapping[str, str] | None, base: str, fd: int, held: Lease, lease_ttl: float,
    io: FileIO,
) -> tuple[int, SifOverlayError | None]:
    """(exit code, None) or (exit code, the error that kept the command from starting)."""
    with _Heartbeat(held, lease_ttl / 3):
        try:
            rootfs = assemble(path, job, writable=writable, mode=mode, uid=user.uid, gid=user.gid, base_dir=base,
                              image_fd=fd, io=io)
        except SifOverlayError as exc:  # assemble tore down what it had set up
            return exc.exit_code, exc
        try:
            return exec_in(rootfs, argv, uid=user.uid, gid=user.gid, groups=user.groups, binds=binds, cwd=cwd,
                           env=env), None
        except StartError as exc:
            return exc.exit_code, exc
        finally:
            teardown(job, base_dir=base, io=io)


def _reconcile(image: str, job: str, journal: str, io: FileIO, fd: int) -> tuple[str | None, str | None]:
    from sifoverlay import engine

    try:
        st = os.fstat(fd)  # the inode the run used, through its fd: never the path again
        result = engine.sync(image, job=job, journal_dir=journal, io=io, image_fd=fd,
                             expect_identity=(st.st_dev, st.st_ino))
    except SifOverlayError as exc:
        log.error("reconcile after the run failed, left for `sifoverlay recover`: %s", exc)
        return None, exc.message()
    return result.action, None


def _default_journal_dir() -> str:
    from sifoverlay.engine.journal import default_journal_dir

    return default_journal_dir()


class _Heartbeat:
    """Extend the lease periodically while the job runs (stopped on exit)."""

    def __init__(self, held: Lease, every: float) -> None:
        self._held = held
        self._every = max(every, 0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._held.heartbeat()
            except SifOverlayError as exc:
                log.error("lease heartbeat failed: %s", exc)
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
