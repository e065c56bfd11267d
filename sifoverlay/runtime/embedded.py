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

from . import environment, jobview
from .assemble import assemble, teardown
from .execute import Bind, StartError, exec_in, hold_signals
from .gpu import DRIVER_PROC

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
class JobOptions:
    """The job environment options (runtime.jobview, runtime.environment, runtime.gpu)."""

    view: jobview.ViewRequest = jobview.ViewRequest()
    env: environment.EnvOptions = environment.EnvOptions()
    workdir: str | None = None  # required inside; None: cwd, else the image's WorkingDir, else /
    gpu: bool = False  # bind the driver's files (exec --nv); the device filter needs no flag
    # where the GPU device nodes and the driver's UUID table are read: the host's, except
    # in tests (a directory of fake nodes); not reachable from the command line
    dev_dir: str = "/dev"
    driver_proc: str = DRIVER_PROC


@dataclass(frozen=True, slots=True)
class ImageSettings:
    env: tuple[tuple[str, str], ...]
    workdir: str | None

    @classmethod
    def of(cls, config: object) -> ImageSettings:
        """From the OCI image config JSON (its "config" object: Env, WorkingDir)."""
        inner = config.get("config") if isinstance(config, dict) else None
        inner = inner if isinstance(inner, dict) else {}
        raw = inner.get("Env")
        entries: list[str] = [e for e in raw if isinstance(e, str)] if isinstance(raw, list) else []
        workdir = inner.get("WorkingDir")
        return cls(tuple(environment.image_env(entries)),
                   workdir if isinstance(workdir, str) and workdir.startswith("/") else None)


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
    options: JobOptions | None = None, io: FileIO = REAL_IO,
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
            settings = ImageSettings.of(img.config.json)
        take = lease.acquire if writable else lease.acquire_shared
        held = take(path, lease.Holder.current(job, "cli"), ttl=lease_ttl, wait=lease_wait, region=region,
                    image_fd=fd, io=io)
        # from here a SIGTERM/SIGHUP ends the run without leaving it half set up or torn down
        with hold_signals():
            try:
                sessions.start(journal, job, path, mode="rw" if writable else "ro", host=host, uid=user.uid,
                               source="cli", details={"lease_token": held.token, "base_dir": base,
                                                      "pid_start": process_start_ticks(os.getpid()),
                                                      "boot_id": boot_id()},
                               io=io)
                returncode, failure = _assemble_and_run(path, job, argv, user=user, writable=writable, mode=mode,
                                                        binds=binds, cwd=cwd, env=env, base=base, fd=fd, held=held,
                                                        lease_ttl=lease_ttl, options=options or JobOptions(),
                                                        settings=settings, io=io)
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
    options: JobOptions, settings: ImageSettings, io: FileIO,
) -> tuple[int, SifOverlayError | None]:
    """(exit code, None) or (exit code, the error that kept the command from starting)."""
    from . import state

    with _Heartbeat(held, lease_ttl / 3):
        try:
            identity = jobview.Identity.lookup(user.uid, user.gid, user.groups)
            request = options.view
            extra: tuple[Bind, ...] = ()
            append: tuple[tuple[str, str], ...] = ()
            from . import gpu

            job_env = os.environ if env is None else env
            # only the allocated GPUs' nodes in the view, --nv or not (SingularityCE --nv
            # shows them all; the allocation is the job's, whatever the flag)
            gpus = gpu.select(job_env, dev_dir=options.dev_dir, proc_dir=options.driver_proc)
            if options.gpu:
                extra, append = gpu.view_binds(gpu.discover(dev_dir=options.dev_dir))
            request = jobview.ViewRequest(tuple(binds) + request.binds, request.site_binds, request.home,
                                          request.host_files, request.extra + extra)
            directory = state.job_dir(base, job)
            all_binds = jobview.check_sources(
                jobview.plan(request, identity, os.path.join(directory, jobview.VIEW_DIR)), user.uid, user.gid)
            rootfs = assemble(path, job, writable=writable, mode=mode, uid=user.uid, gid=user.gid, base_dir=base,
                              image_fd=fd, mountpoints=jobview.mountpoints(all_binds), io=io)
        except SifOverlayError as exc:  # assemble tore down what it had set up
            return exc.exit_code, exc
        try:
            if request.host_files:
                jobview.write_identity(directory, rootfs.path, identity, io=io)
            # as root for another user (sudo): root's PATH must not reach the job as is
            final_env = environment.compose(job_env, settings.env, options.env, user=identity.name,
                                            home=identity.home, append=append,
                                            drop_path=os.geteuid() == 0 and user.uid != 0)
            if gpus is not None and gpus.cuda_visible_devices is not None \
                    and "CUDA_VISIBLE_DEVICES" not in dict(options.env.set):
                final_env["CUDA_VISIBLE_DEVICES"] = gpus.cuda_visible_devices  # CUDA numbers what it sees
            cwds = environment.workdir_candidates(options.workdir, cwd, settings.workdir)
            return exec_in(rootfs, argv, uid=user.uid, gid=user.gid, groups=user.groups, binds=all_binds,
                           cwd=cwds, cwd_required=options.workdir is not None, env=final_env,
                           dev=gpu.device_view(gpus, options.dev_dir)), None
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
