"""Slurm Prolog (slurm.conf ``Prolog=``, via slurm_plugin/hooks/prolog): prepare the
job's image before any of its tasks start.

Runs as root on the node, with no PATH. For a job submitted with --oci-sif-overlay:

1. authorize as the job's user (the uid must be able to write the image for rw, read it
   for ro; O_NOFOLLOW; inside the image roots) — `authorize.authorize`;
2. take the lease with the job as holder (writer for rw, reader for ro), TTL lease_ttl;
3. check the path still names the inode that was authorized (symlink/rename swap);
4. record the job session (one per job and node) in the journal directory (what the
   Epilog and the sweeper reconcile), and start the job's lease keeper (slurm/keeper.py:
   heartbeat while the job runs, fencing when the lease is lost);
5. rw only: if the ext3 was left dirty by an earlier crash, reconcile it first
   (engine.sync replays the ext3 journal with e2fsck in userspace and records the digest);
6. assemble the rootfs with sifoverlay.runtime (FUSE mounts as the job's user by
   default; kernel mounts only with plugstack mount=kernel);
7. write the record the plugin reads in slurmstepd (`records.write_ready`).

With plugstack prolog_mounts=detached (the default) the Prolog forks first, and its child
(the mounter) does steps 1-7. Once the job holds its lease and session (after step 5) the
mounter writes a ``preparing`` record and lets the Prolog exit, so slurmd starts the job
while steps 6-7 run; the plugin waits in slurmstepd for ``ready`` while the mounter lives.
srun asks for the Prolog's end at 0.1, 0.3, 0.6 s (docs/slurm.md "Job start"): the mounts
overlap that wait instead of adding to it. Until it lets the Prolog go, the mounter dies
with it (PR_SET_PDEATHSIG), exactly as an inline Prolog killed by slurmd would.

Any refusal (not authorized, busy, not an OCI-SIF, ...) is written as a refused record
and the Prolog still exits 0: a failing Prolog drains the node and requeues the job.
The plugin fails the job's tasks with the message on the job's stderr instead. Nothing
is mounted and the image is not written before authorization and the lease succeed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from typing import Any, Callable, Final

from sifoverlay.errors import Ext3FormatError, ImageBusy, OverlayStateError, SifOverlayError
from sifoverlay.fsio import REAL_IO, FileIO

from . import records, taskview
from .authorize import ImageIdentity, authorize, verify_unchanged
from .config import SlurmConfig, load_config
from .jobenv import JobEnv

__all__ = ["LEASE_TTL", "main", "prepare"]

log = logging.getLogger(__name__)

# The lease lives lease_ttl seconds (plugstack, default 3 minutes) past its last
# heartbeat; the job's keeper (slurm/keeper.py) renews it while the job runs, the job end
# releases it. Kept for older callers: the default TTL.
LEASE_TTL: Final = 180.0


class _ParseLock:
    """A :ro job may start while the previous writer's job end still commits (engine/lease.py,
    phase "reconciling"): what the Prolog parses of the image's metadata, from the lease's
    region lookup to the job view, it parses under the metadata read lock the commit honours
    (leaselock.metadata_lock). It lets the lock go while it waits for a holder: the commit
    it waits for may need it."""

    def __init__(self, fd: int, enabled: bool) -> None:
        self._fd, self._enabled = fd, enabled
        self._held: contextlib.ExitStack | None = None

    def hold(self) -> None:
        if self._enabled and self._held is None:
            from sifoverlay.engine.leaselock import metadata_lock

            self._held = contextlib.ExitStack()
            self._held.enter_context(metadata_lock(self._fd, exclusive=False))

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


def _take_lease(identity: ImageIdentity, job: JobEnv, config: SlurmConfig, parsing: _ParseLock) -> Any:
    from sifoverlay.engine import lease

    holder = lease.Holder(socket.gethostname(), os.getpid(), job.job_id, "slurm", uid=job.uid)
    take = lease.acquire if job.mode == "rw" else lease.acquire_shared
    where = {"image_fd": identity.fd, "state_dir": config.state_dir}
    timing = {"ttl": config.lease_ttl, "grace": config.lease_grace}
    parsing.hold()
    try:
        return take(identity.path, holder, **timing, **where)
    except ImageBusy:
        parsing.release()
        if _wait_for_own_end(job, config):  # a requeued run: its previous run's end just finished
            parsing.hold()
            return take(identity.path, holder, **timing, **where)
        # A requeued job (same id) whose previous run on THIS node and boot was not cleaned
        # up yet: its lease (resume matches host and boot_id, never the job id alone).
        again = lease.resume(identity.path, job.job_id, **where)
        if again is not None:
            if again.info.record.get("phase") is not None:  # readers may have joined it meanwhile
                raise ImageBusy(identity.path, f"held by job {job.job_id}'s previous run, whose reconcile is "
                                "not finished (left for the sweeper)", holder=again.info.as_dict()) from None
            log.warning("job %s already holds the lease of %s (requeue): reusing it", job.job_id, identity.path)
            return again
        if not _finish_dead_holders(identity, config) and not _wait_for_ending_holders(identity, job, config):
            raise
    parsing.hold()
    return take(identity.path, holder, **timing, **where)


def _wait_for_own_end(job: JobEnv, config: SlurmConfig) -> bool:
    """A requeued job whose previous run's end (its Epilog or reconcile worker) is still in
    progress: wait for it, bounded by the hash deadline. Reusing that run's lease meanwhile
    would mount the ext3 read-write while the worker hashes it. True when there was one and
    it finished."""
    from . import endlock

    if not endlock.in_progress(config.journal_dir, job.job_id):
        return False
    log.info("job %s: the end of its previous run is still in progress: waiting for it", job.job_id)
    deadline = time.monotonic() + config.hash_deadline + 30
    while endlock.in_progress(config.journal_dir, job.job_id):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _wait_for_ending_holders(identity: ImageIdentity, job: JobEnv, config: SlurmConfig) -> bool:
    """The holder's job is over in slurmctld (which gave its license to this job) but its
    Epilog, or the reconcile worker it started (slurm/reconciler.py), is still reconciling:
    wait for it, bounded by the Epilog's own hash deadline. Only the leases that keep THIS
    job out count: a reader waits for the writer alone (the reader leases its own job's
    other nodes take meanwhile, or other ro jobs', are no obstacle); a writer for all."""
    from sifoverlay.engine import lease

    from .multinode import wait_for_ending_holders

    where = {"image_fd": identity.fd, "state_dir": config.state_dir}

    def holders() -> list[tuple[str, str]]:
        found = [lease.inspect(identity.path, **where)]
        if job.mode == "rw":
            found += lease.readers(identity.path, **where)
        return [(h.source, h.job_id) for h in found if h is not None and h.job_id != job.job_id]

    from . import endlock

    return wait_for_ending_holders(holders, timeout=config.hash_deadline + 30,
                                   ending=lambda job_id: endlock.in_progress(config.journal_dir, job_id))


def _start_keeper(held: Any, identity: ImageIdentity, job: JobEnv, config: SlurmConfig, key: str) -> Any:
    """Start the job's lease keeper (heartbeat + fencing), unless one already keeps this
    lease (a requeue on this node reusing it). Returns a callable that waits until it has
    renewed the lease (the Prolog mounts meanwhile: the keeper's start costs no time)."""
    from sifoverlay.engine import procs

    from . import keeper

    info = held.info
    if info.record.get("keeper") and procs.process_alive(info.pid, info.started):
        return lambda: None
    proc = keeper.start(job_id=job.job_id, key=key, token=held.token, image=identity.path, dev=identity.dev,
                        ino=identity.ino, state_dir=config.state_dir, journal_dir=config.journal_dir,
                        mounts_dir=config.mounts_dir, ttl=config.lease_ttl, grace=config.lease_grace,
                        host=socket.gethostname(), wait=False)
    return lambda: keeper.wait_ready(proc, job_id=job.job_id, key=key, token=held.token, state_dir=config.state_dir)


def _finish_dead_holders(identity: ImageIdentity, config: SlurmConfig) -> bool:
    """The image is held by Slurm jobs of THIS node that slurmctld says are over (their
    Epilog never ran, no sweep since): do their job end now, as the sweeper would.
    True when every such holder was finished (worth retrying the lease)."""
    from sifoverlay.engine import lease

    from .jobend import finish_job
    from .jobstate import select_backend

    image = identity.path
    host = socket.gethostname()
    where = {"image_fd": identity.fd, "state_dir": config.state_dir}
    holders = [h for h in [lease.inspect(image, **where), *lease.readers(image, **where)] if h is not None]
    if not holders or any(h.source != "slurm" or h.host != host for h in holders):
        return False
    backend = select_backend()
    for held in holders:
        if backend.is_alive(held.job_id) is not False:
            return False
    for held in holders:
        log.warning("%s: held by job %s, which is over but was never cleaned up: finishing it first",
                    image, held.job_id)
        ended = finish_job(held.job_id, config, reason="prolog")
        if not ended.ok or ended.result == "busy":  # busy: its reconcile worker ends it (we wait for it)
            return False
    return True


def _check_image(identity: ImageIdentity, writable: bool, config: SlurmConfig | None = None) -> None:
    """A valid OCI-SIF, with an ext3 overlay when the job wants to write; for rw jobs the
    overlay is within the configured bounds (max_overlay, region vs ext3 size) BEFORE any
    hashing can happen (docs/security.md, bounded work)."""
    from sifoverlay.engine.reconcile import check_overlay_bounds
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    with open_image(SifFile.from_fd(os.dup(identity.fd), identity.path)) as img:
        if writable and img.overlay is None:
            raise OverlayStateError(identity.path, "has no writable ext3 overlay: add one with "
                                    "'sifoverlay overlay create' or run the job with :ro")
    if writable:
        check_overlay_bounds(identity.path, identity.fd, max_bytes=(config or SlurmConfig()).max_overlay)
        from sifoverlay.engine.capacity import preflight  # issue 18: room for the job and its end-of-job commit

        preflight(identity.path, identity.fd, min_free_bytes=(config or SlurmConfig()).min_free)


def _reconcile_if_dirty(identity: ImageIdentity, job: JobEnv, config: SlurmConfig) -> None:
    from sifoverlay import engine
    from sifoverlay.ext3 import Superblock
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    image = identity.path
    with open_image(SifFile.from_fd(os.dup(identity.fd), image)) as img:
        overlay = img.overlay
        if overlay is None:
            return
        try:
            dirty = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size).is_dirty
        except Ext3FormatError as exc:  # name the image, not the fd
            raise Ext3FormatError(image, f"ext3 overlay at offset {overlay.offset}: {exc.problem}") from None
    if dirty:
        log.warning("%s: overlay left dirty by an earlier job: reconciling before job %s", image, job.job_id)
        # On root's authorized fd, never by path: a rename/symlink swap cannot redirect it.
        result = engine.sync(image, job=job.job_id, journal_dir=config.journal_dir, image_fd=identity.fd,
                             expect_identity=(identity.dev, identity.ino), max_bytes=config.max_overlay,
                             deadline=time.monotonic() + config.hash_deadline, as_user=(job.uid, job.gid))
        log.info("%s: %s (%s)", image, result.action, result.new_digest)


Release = Callable[[], None]


def prepare(job: JobEnv, config: SlurmConfig, *, io: FileIO = REAL_IO, release: Release | None = None) -> str:
    """Steps 1-7 of the module docstring; returns the rootfs path. Raises a
    SifOverlayError on refusal, after undoing whatever it had done. Lease records and
    scratch files go to the configured root state directory (plugstack state_dir=).
    `release` (the detached mounter's): called once the job holds its lease and session,
    after the ``preparing`` record is written."""
    from sifoverlay.engine import statedir

    with statedir.using(config.state_dir):
        return _prepare(job, config, io=io, release=release)


def _prepare(job: JobEnv, config: SlurmConfig, *, io: FileIO = REAL_IO, release: Release | None = None) -> str:
    from .phases import PhaseClock

    clock = PhaseClock("prolog", job.job_id)
    try:
        path = _prepare_timed(job, config, clock, io=io, release=release)
    except BaseException:
        clock.lap("refused")
        clock.record(result="refused", mode=job.mode)
        raise
    clock.record(result="ready", mode=job.mode)
    return path


def _prepare_timed(job: JobEnv, config: SlurmConfig, clock: Any, *, io: FileIO = REAL_IO,
                   release: Release | None = None) -> str:
    from sifoverlay import runtime
    from sifoverlay.engine import sessions, statedir

    assert job.image is not None and job.mode is not None
    writable = job.mode == "rw"
    if writable:  # before anything touches the image: never rw on two nodes
        from .multinode import check_rw_allowed

        check_rw_allowed(job.image, job.job_id)
    clock.lap("rule")
    identity = authorize(job.image, uid=job.uid, gid=job.gid, user=job.user, writable=writable,
                         image_roots=config.image_roots)
    clock.lap("authorize")
    image = identity.path
    parsing = _ParseLock(identity.fd, enabled=not writable)
    copyup_child = _start_copyup_child(job, config) if writable else None
    try:
        held = _take_lease(identity, job, config, parsing)
        clock.lap("lease")
        started = assembled = False
        keeper_ready: Any = None
        host = socket.gethostname()
        try:
            verify_unchanged(image, identity.dev, identity.ino)
            _check_image(identity, writable, config)
            clock.lap("check")
            key = statedir.identity_key(identity.fd)
            sessions.start(config.journal_dir, job.job_id, image, mode=job.mode, host=host,
                           uid=job.uid, source="slurm", io=io, per_host=True,
                           details={"dev": identity.dev, "ino": identity.ino, "gid": job.gid,
                                    "user": job.user, "mount": config.mount, "token": held.token,
                                    "key": key, "state_dir": config.state_dir})
            started = True
            # Before anything is mounted: the keeper's pid is older than the FUSE daemons'.
            keeper_ready = _start_keeper(held, identity, job, config, key)
            clock.lap("session")
            if writable:
                _reconcile_if_dirty(identity, job, config)
                clock.lap("dirty")
            if release is not None:  # the job is admitted: slurmd may start it while we mount
                from sifoverlay.engine import procs

                me = os.getpid()
                records.write_preparing(config.records_dir, job.job_id, image, job.mode, requested=job.image,
                                        preparer=(me, procs.process_start_ticks(me) or 0), io=io)
                release()
                clock.lap("release")
                clock.mark("prolog_exit")
            # The runtime mounts through our authorized fd (no path lookup after the check)
            # and hands the lease's byte-range lock fd to the ext3 FUSE daemon, so the lock
            # lives exactly as long as the ext3 mount, long after this Prolog exits.
            lock_fd = held.lock_fd  # None for a lease resumed after a requeue
            view = taskview.plan(job.uid, job.gid, config.mounts_dir, job.job_id, config, os.environ)
            rootfs = runtime.assemble(image, job.job_id, writable=writable, mode=config.mount,
                                      uid=job.uid, gid=job.gid, base_dir=config.mounts_dir,
                                      image_fd=identity.fd, hold_fds=() if lock_fd is None else (lock_fd,),
                                      mountpoints=view.mountpoints, copyup_child=copyup_child)
            assembled = True
            clock.lap("mounts")
            verify_unchanged(image, identity.dev, identity.ino)
            path = rootfs.path
            taskview.finish(view, config, job.job_id, path, identity.fd, io=io)  # job environment (issue 14)
            parsing.release()
            clock.lap("view")
            keeper_ready()  # before the job may start: its lease is heartbeated
            clock.lap("keeper")
            records.write_ready(config.records_dir, job.job_id, image, job.mode, path, requested=job.image, io=io)
            clock.lap("record")
        except BaseException:
            if assembled:
                _quietly(runtime.teardown, job.job_id, base_dir=config.mounts_dir)
            if started:
                _quietly(sessions.finish, config.journal_dir, job.job_id, "refused", io=io, host=host)
            from . import keeper

            if keeper_ready is not None:
                _quietly(keeper_ready)  # a keeper still starting would not be found by stop()
            _quietly(keeper.stop, _current(held))
            _quietly(held.release)
            raise
    finally:
        if copyup_child is not None:
            copyup_child.cancel()  # reaps it; it has run by now unless the job was refused
        parsing.release()
        identity.close()
    log.info("job %s: %s ready (%s) at %s", job.job_id, image, job.mode, path)
    return path


def _start_copyup_child(job: JobEnv, config: SlurmConfig) -> Any:
    """The rw job user's copy-up child (runtime/copyup.py), started now so that its
    interpreter starts while the lease is taken and the daemons mount: it is on every rw
    job's start path, and srun rounds the Prolog's time up to 0.3 or 0.6 s (docs/slurm.md)."""
    from sifoverlay.runtime import copyup

    if config.mount != "fuse" or not copyup.as_user(job.uid, job.gid):
        return None
    try:
        return copyup.UserChild.start(job.uid, job.gid)
    except OSError as exc:  # assemble starts its own
        log.warning("job %s: cannot start the copy-up child early: %s", job.job_id, exc)
        return None


def _current(held: Any) -> Any:
    """The lease record as it is now (the keeper has rewritten it as holder)."""
    from sifoverlay.engine.leasefile import read_info

    return read_info(held.file_path)


def _quietly(func: Any, *args: Any, **kwargs: Any) -> None:
    try:
        func(*args, **kwargs)
    except Exception:
        log.exception("cleanup step %s failed", getattr(func, "__name__", func))


def run(env: dict[str, str] | None = None, *, config: SlurmConfig | None = None,
        release: Release | None = None) -> str:
    """The Prolog without the process around it: 'skipped' | 'ready' | 'refused'."""
    problem = None
    if config is None:
        try:
            config = load_config(env=env)
        except SifOverlayError as exc:
            config, problem = SlurmConfig(), f"sifoverlay is misconfigured on this node: {exc.message()}"
    job = JobEnv.from_env(env, default_mode=config.default_mode)
    if job.image is None:
        return "skipped"
    from . import logsetup

    logsetup.set_fields(job=job.job_id, image=job.image)
    try:
        if problem is not None:
            raise SifOverlayError(None, problem)
        prepare(job, config, release=release)
        return "ready"
    except SifOverlayError as exc:
        message = exc.message()
    except Exception as exc:  # never fail the Prolog: refuse the job instead
        log.exception("job %s: unexpected error", job.job_id)
        message = f"{job.image}: internal error in the sifoverlay Prolog: {type(exc).__name__}: {exc}"
    log.error("job %s refused: %s", job.job_id, message)
    records.write_refused(config.records_dir, job.job_id, job.image, f"refused: {message}")
    return "refused"


def _set_parent_death_signal(signum: int) -> None:
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _become_mounter(prolog_pid: int) -> None:
    """The forked child: dies with the Prolog until released, leaves its process group
    and slurmd's output pipe (slurmd reads the Prolog's output to its end)."""
    import signal

    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != prolog_pid:  # the Prolog was killed before the line above
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)  # io-seam: exempt (/dev/null for the mounter's stdio)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def run_detached(config: SlurmConfig, job: JobEnv) -> str:
    """prolog_mounts=detached: fork the mounter, wait until it releases us (the job holds
    its lease; records.py ``preparing``) or ends (refused: its record says why).
    Returns 'released' or 'ended'."""
    read_end, write_end = os.pipe()  # both close-on-exec: no daemon the mounter starts keeps them
    prolog_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            _become_mounter(prolog_pid)

            def release() -> None:
                _set_parent_death_signal(0)  # from now on the job's start needs us, not the Prolog
                os.write(write_end, b"1")  # io-seam: exempt (a pipe to the waiting Prolog)
                os.close(write_end)

            run(config=config, release=release)
        except BaseException:
            log.exception("prolog mounter crashed")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        got = os.read(read_end, 1)
    finally:
        os.close(read_end)
    if got:
        return "released"
    os.waitpid(child, 0)
    if job.image is not None and records.read(config.records_dir, job.job_id) is None:
        # it died before it could refuse the job in its record: the tasks must still learn why
        log.error("job %s: the Prolog's mounter ended without a record", job.job_id)
        records.write_refused(config.records_dir, job.job_id, job.image,
                              f"refused: {job.image}: the sifoverlay Prolog's mounter died before it could "
                              "prepare the job (the node's sifoverlay log says why)")
    return "ended"


def _job_with_image(config: SlurmConfig) -> JobEnv | None:
    try:
        job = JobEnv.from_env(None, default_mode=config.default_mode)
    except SifOverlayError:
        return None  # run() says what is wrong, inline
    return job if job.image is not None else None


def main(argv: list[str] | None = None) -> int:
    from . import logsetup

    logsetup.setup("prolog", verbose="-v" in (argv or sys.argv[1:]), job=os.environ.get("SLURM_JOB_ID", ""))
    try:
        try:
            config = load_config()
        except SifOverlayError:
            config = None  # run() refuses the job with the message
        job = _job_with_image(config) if config is not None and config.prolog_mounts == "detached" else None
        if config is not None and job is not None:
            run_detached(config, job)
        else:
            run(config=config)
    except BaseException:  # whatever happens, do not drain the node
        log.exception("prolog crashed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
