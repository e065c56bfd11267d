"""What happens when a job that used an image is over — shared by the Epilog (normal
path) and the sweeper (the Epilog never ran or failed).

Order, each step idempotent so a second run after a crash is harmless:
  1. tear down the job's rootfs (FUSE/kernel mounts, loop devices) — sifoverlay.runtime;
  2. rw: check the path still names the inode the Prolog authorized, then
     engine.sync inside the job's own lease (recovers an unfinished commit first,
     replays the ext3 journal with e2fsck, hashes, commits the new digest);
  3. release the job's lease (writer or reader);
  4. close the job session in the journal directory;
  5. drop the plugin's per-job record.
A step that fails stops the sequence: the session and the lease stay, so the image is
not handed to another job half-reconciled, and the sweeper tries again later. Nothing
here raises: the outcome says what happened.

Every engine.sync is counted in the events textfile (sifoverlay.metrics.events; docs/
metrics.md) of `metrics_dir()`. Recording never changes the outcome: metrics errors, and
a missing prometheus-client, are logged and ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sifoverlay.errors import SifOverlayError
from sifoverlay.fsio import REAL_IO, FileIO

from . import reclaim, records
from .authorize import verify_unchanged
from .config import SlurmConfig

__all__ = ["DEFAULT_TEXTFILE_DIR", "ENV_TEXTFILE_DIR", "JobEndOutcome", "finish_foreign", "finish_job", "metrics_dir",
           "record_event"]

log = logging.getLogger(__name__)

ENV_TEXTFILE_DIR: Final = "SIFOVERLAY_TEXTFILE_DIR"  # same variable as sifoverlay.metrics.record
DEFAULT_TEXTFILE_DIR: Final = "/var/lib/prometheus/node-exporter"


def metrics_dir(env: Mapping[str, str] | None = None) -> str | None:
    """The node_exporter textfile directory the Slurm hooks write to: $SIFOVERLAY_TEXTFILE_DIR,
    else the Debian node_exporter default; None when it is not an existing directory
    (a node without node_exporter: no metrics, and no warning at every job end)."""
    directory = (os.environ if env is None else env).get(ENV_TEXTFILE_DIR) or DEFAULT_TEXTFILE_DIR
    return directory if os.path.isdir(directory) else None


def record_event(directory: str | None, op: str, outcome: Any, *, seconds: float | None = None) -> None:
    """Count one engine call ("sync", "recover", "break-stale") in the events textfile;
    never raises. The equivalent of sifoverlay.metrics.record.recording, which slurm may
    not import (tests/test_layers.py: only metrics.textfile/events are shared)."""
    if directory is None:
        return
    try:
        from sifoverlay.metrics.events import record_result
    except ImportError as exc:
        log.warning("textfile dir %s: metrics need prometheus-client (%s)", directory, exc)
        return
    try:
        record_result(directory, op, outcome, seconds=seconds)
    except Exception:  # record_result swallows its own errors; this is the last guard
        log.exception("recording %s metrics in %s failed", op, directory)


@dataclass(frozen=True, slots=True)
class JobEndOutcome:
    job_id: str
    image: str | None
    # "reconciled" | "noop" | "released" | "fenced" | "refused" | "image-missing" | "nothing" | "failed";
    # "pending": the Epilog handed the hash to the reconcile worker; "busy": another process ends the job
    result: str
    step: str  # the last step attempted
    detail: str = ""
    new_digest: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result != "failed"

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def finish_job(job_id: str, config: SlurmConfig, *, reason: str, textfile_dir: str | None = None,
               io: FileIO = REAL_IO, host: str | None = None) -> JobEndOutcome:
    """Steps 1-5 for `job_id` on `host` (None: this node); `reason` ("epilog", "sweeper")
    goes into the logs. The sync is counted in `textfile_dir` (None: `metrics_dir()`).
    Lease records: the configured root state directory (plugstack state_dir=). For another
    host's session (the cluster sweeper, after that host's lease was found stale and
    broken: sweeper.py) there is nothing to tear down here and the sync takes a lease of
    its own."""
    import socket

    from sifoverlay.engine import statedir

    from . import endlock

    with statedir.using(config.state_dir):
        with endlock.ending(config.journal_dir, job_id, host or socket.gethostname()) as lock:
            if lock is None:  # its reconcile worker (or a sweep) is ending it right now
                log.info("job %s (%s): its end is in progress in another process: left to it", job_id, reason)
                return JobEndOutcome(job_id, None, "busy", "lock", "its end is in progress in another process")
            return _finish_job(job_id, config, reason=reason, textfile_dir=textfile_dir, io=io, host=host,
                               lock=lock)


def finish_pending(job_id: str, config: SlurmConfig, lock: Any, *, host: str | None = None,
                   io: FileIO = REAL_IO) -> JobEndOutcome:
    """The reconcile worker's part of an async job end (slurm/reconciler.py): steps 2-5
    under the job-end `lock` the Epilog handed over, with no hash deadline."""
    from sifoverlay.engine import statedir

    with statedir.using(config.state_dir):
        return _finish_job(job_id, config, reason="worker", textfile_dir=None, io=io, host=host, lock=lock)


def _finish_job(job_id: str, config: SlurmConfig, *, reason: str, textfile_dir: str | None,
                io: FileIO, host: str | None = None, lock: Any = None) -> JobEndOutcome:
    import socket

    from sifoverlay.engine import sessions

    from .phases import PhaseClock

    textfile_dir = textfile_dir if textfile_dir is not None else metrics_dir()

    start = time.monotonic()
    clock = PhaseClock(reason, job_id)
    host = host or socket.gethostname()
    local = host == socket.gethostname()
    # First the job's mounter, when the job ends while it still mounts (prolog_mounts=detached)
    record = records.wait_for_preparer(config.records_dir, job_id) if local else None
    session = sessions.load(config.journal_dir, job_id, host=host)

    def outcome(result: str, step: str, detail: str = "", digest: str | None = None) -> JobEndOutcome:
        image = session.image if session is not None else (record.image if record else None)
        done = JobEndOutcome(job_id, image, result, step, detail, digest, time.monotonic() - start)
        (log.error if result == "failed" else log.info)(
            "job %s (%s): %s at step %s%s", job_id, reason, result, step, f": {detail}" if detail else "")
        if session is not None:
            clock.lap(step)
            clock.record(result=result, mode=session.mode)
        return done

    if session is None:
        if not local:
            return outcome("nothing", "session", f"no open session of host {host}")
        _teardown_quietly(job_id, config)
        records.remove(config.records_dir, job_id, io=io)
        if record is not None and record.status == "refused":
            return outcome("refused", "record", record.message)
        return outcome("nothing", "session", "no open session for this job")

    step = "teardown"
    try:
        from sifoverlay import runtime

        if local:
            runtime.teardown(job_id, base_dir=config.mounts_dir)
        clock.lap("unmount")
        result, digest = "released", None
        fenced = _lost_lease(session, config) if local else None
        if fenced is not None:
            # Our lease was broken (this node was frozen or cut off past expiry + grace) and
            # the keeper fenced the job: the image may belong to another job by now. Its
            # writes since the last commit are lost; touching the image would corrupt it.
            log.error("job %s: its lease on %s was lost (%s): not reconciled here", job_id, session.image, fenced)
            result = "fenced"
        elif not os.path.lexists(session.image):
            # Deleted while the job ran (or since): nothing left to reconcile, and keeping
            # the session would make every sweep fail forever.
            log.error("job %s: image %s no longer exists: closing its session", job_id, session.image)
            result = "image-missing"
        elif session.mode == "rw":
            step = "verify"
            dev, ino = session.details.get("dev"), session.details.get("ino")
            identity = (int(dev), int(ino)) if dev is not None and ino is not None else None
            if identity is not None:
                verify_unchanged(session.image, *identity)
            clock.lap("verify")
            if reason == "epilog" and config.epilog_reconcile == "async" and local and lock is not None:
                step = "handoff"
                worker = _hand_off(session, job_id, host, identity, lock, config, io)
                if worker is not None:
                    records.remove(config.records_dir, job_id, io=io)  # the plugin's record: the tasks are over
                    return outcome("pending", step, f"reconcile worker pid {worker}")
            step = "claim"  # an expired lease is won back first, or left to who broke it (slurm/reclaim.py)
            lost = reclaim.expired_lease(session, config, io=io) if local else None
            if lost is not None:
                records.remove(config.records_dir, job_id, io=io)
                return outcome("fenced", step, lost)
            step = "sync"
            # The Epilog hashes for at most hash_deadline seconds (a timed-out Epilog drains
            # the node); past it the session and lease stay for the sweeper, which has none.
            deadline = time.monotonic() + config.hash_deadline if reason == "epilog" else None
            gid = session.details.get("gid")
            as_user = (session.uid, int(gid)) if gid is not None else None
            synced = _counted_sync(session.image, job_id, config, textfile_dir, io, identity, deadline, as_user,
                                   who=_job_who(job_id, session.uid, reason))
            clock.lap("sync")
            clock.add(synced.phases, within="sync")
            result, digest = ("noop" if synced.action == "noop" else "reconciled"), synced.new_digest
        step = "release"
        if local:
            _release_lease(session.image, job_id, io, session.details.get("key"), config.state_dir)
        clock.lap(step)
        step = "session"
        sessions.finish(config.journal_dir, job_id, result, io=io, host=host)
        clock.lap(step)
        step = "record"
        if local:
            records.remove(config.records_dir, job_id, io=io)
        return outcome(result, step, digest=digest)
    except SifOverlayError as exc:
        return outcome("failed", step, exc.message())
    except Exception as exc:  # the Epilog must survive anything
        log.exception("job %s: %s failed", job_id, step)
        return outcome("failed", step, f"{type(exc).__name__}: {exc}")


def finish_foreign(session: Any, config: SlurmConfig, *, textfile_dir: str | None = None,
                   io: FileIO = REAL_IO) -> JobEndOutcome:
    """The job end of ANOTHER host's session, run by the cluster sweeper after it found that
    host's lease stale by its heartbeat and broke it (sweeper.py): recover the image's
    interrupted operations from the shared journal and reconcile it under a lease of this
    node (engine.sync takes it: the dead holder's is gone), then close the session. There
    is nothing to tear down or release here: the mounts and keeper died with their node."""
    from sifoverlay.engine import sessions, statedir

    textfile_dir = textfile_dir if textfile_dir is not None else metrics_dir()
    start = time.monotonic()
    step, result, digest = "verify", "released", None
    try:
        with statedir.using(config.state_dir):
            if not os.path.lexists(session.image):
                result = "image-missing"
            elif session.mode == "rw":
                dev, ino = session.details.get("dev"), session.details.get("ino")
                identity = (int(dev), int(ino)) if dev is not None and ino is not None else None
                if identity is not None:
                    verify_unchanged(session.image, *identity)
                step = "sync"
                gid = session.details.get("gid")
                as_user = (session.uid, int(gid)) if gid is not None else None
                synced = _counted_sync(session.image, session.job_id, config, textfile_dir, io, identity, None,
                                       as_user, who=_job_who(session.job_id, session.uid, "sweeper"))
                result, digest = ("noop" if synced.action == "noop" else "reconciled"), synced.new_digest
            step = "session"
            sessions.finish(config.journal_dir, session.job_id, f"{result} by {_here()} for {session.host}",
                            io=io, host=session.host)
    except SifOverlayError as exc:
        result, detail = "failed", exc.message()
    except Exception as exc:  # noqa: BLE001 - a sweep goes on
        log.exception("job %s (host %s): %s failed", session.job_id, session.host, step)
        result, detail = "failed", f"{type(exc).__name__}: {exc}"
    else:
        detail = f"taken over from host {session.host}"
    (log.error if result == "failed" else log.warning)("job %s of host %s: %s at step %s: %s", session.job_id,
                                                        session.host, result, step, detail)
    return JobEndOutcome(session.job_id, session.image, result, step, detail, digest, time.monotonic() - start)


def _hand_off(session: Any, job_id: str, host: str, identity: tuple[int, int] | None, lock: Any,
              config: SlurmConfig, io: FileIO) -> int | None:
    """Async job end: mark the session "reconcile pending" durably (with the superblock
    fingerprint seen now) and start the reconcile worker with the job-end lock. The pid,
    or None when the Epilog ends the job itself: the overlay is untouched (a no-op sync)
    or the worker could not start."""
    from sifoverlay.engine import sessions

    from . import reconciler

    seen, recorded, dirty = _fingerprints(session.image, identity)
    if seen is not None and seen == recorded:
        return None  # untouched since its last commit: the Epilog's no-op sync takes milliseconds
    sessions.amend(config.journal_dir, job_id, {"pending": "reconcile", "ended": time.time(),
                                                "fingerprint": seen},
                   io=io, host=host)
    if dirty is False:  # unmounted clean: only hashing and a commit are left, readers may join
        _admit_readers(session, job_id, config, io)
    try:
        pid = reconciler.spawn(job_id, host, lock.fd, config)
    except OSError as exc:  # the session's mark stays: harmless, the Epilog ends the job now
        log.error("job %s: cannot start the reconcile worker (%s): reconciling in the Epilog", job_id, exc)
        return None
    lock.hand_over()
    log.info("job %s: node released; reconcile worker pid %d hashes %s", job_id, pid, session.image)
    return pid


def _admit_readers(session: Any, job_id: str, config: SlurmConfig, io: FileIO) -> None:
    """Mark the job's lease "reconciling" (engine/lease.py): a next :ro job on the image
    starts at once instead of waiting for the hash; a writer still waits for the commit."""
    from sifoverlay.engine import lease

    key = session.details.get("key")
    if key is None:
        return
    try:
        held = lease.resume(None, job_id, io=io, key=str(key), state_dir=config.state_dir)
        if held is not None and not held.shared:
            held.set_phase(lease.READERS_ADMITTED)
    except (OSError, SifOverlayError) as exc:  # readers wait for the commit instead
        log.warning("job %s: readers not admitted during the reconcile: %s", job_id, exc)


def _fingerprints(image: str, identity: tuple[int, int] | None) -> tuple[Any, Any, bool | None]:
    """(the overlay's ext3 superblock fingerprint now, the one recorded with its digest,
    whether the ext3 needs a replay or fsck): what 'modified' means, read through a checked
    fd of the authorized inode; (None, None, None) when it cannot be read (the worker
    hashes anyway)."""
    from sifoverlay.engine import statedir
    from sifoverlay.ext3 import Superblock
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    try:
        fd = statedir.open_image_checked(image, expect_identity=identity)
    except (OSError, SifOverlayError):
        return None, None, None
    try:
        with open_image(SifFile.from_fd(os.dup(fd), image)) as img:
            overlay = img.overlay
            if overlay is None:
                return None, None, None
            sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
            return sb.fingerprint(), overlay.fingerprint, sb.is_dirty
    except (OSError, SifOverlayError):
        return None, None, None
    finally:
        os.close(fd)


def _here() -> str:
    import socket

    return socket.gethostname()


def _counted_sync(
    image: str, job_id: str, config: SlurmConfig, textfile_dir: str | None, io: FileIO,
    identity: tuple[int, int] | None = None, deadline: float | None = None,
    as_user: tuple[int, int] | None = None, who: Any = None,
) -> Any:
    """engine.sync inside the job's lease, its result or exception counted (op "sync").
    `identity`: the inode the Prolog authorized; the engine re-checks it on its own fd, which
    closes the window between verify_unchanged and the sync's open."""
    from sifoverlay import engine

    began = time.monotonic()
    try:
        synced = engine.sync(image, job=job_id, journal_dir=config.journal_dir, io=io, expect_identity=identity,
                             deadline=deadline, max_bytes=config.max_overlay, as_user=as_user,
                             who=who, op="recover" if who is not None and who.via == "sweeper" else "sync")
    except Exception as exc:
        record_event(textfile_dir, "sync", exc, seconds=time.monotonic() - began)
        raise
    record_event(textfile_dir, "sync", synced)  # its own .seconds is the duration
    return synced


def _job_who(job_id: str, uid: int, reason: str) -> Any:
    """The revision's who (issue 18): job, cluster, user, node, exit state."""
    from .jobwho import who_for_job

    return who_for_job(job_id, uid, reason=reason)


def _release_lease(image: str, job_id: str, io: FileIO, key: str | None = None, state_dir: str | None = None) -> None:
    """Release the job's lease by the identity key the Prolog recorded (no path lookup);
    sessions of older versions (no key) fall back to a checked open of the path."""
    from sifoverlay.engine import lease

    try:
        if key is not None:
            held = lease.resume(None, job_id, io=io, key=str(key), state_dir=state_dir)
        else:
            held = lease.resume(image, job_id, io=io, state_dir=state_dir)
    except FileNotFoundError:  # the image (or its directory) is gone too
        held = None
    if held is None:
        _break_dead_records(image, job_id, key, state_dir, io)
        log.info("job %s: no lease of its own on %s (already released)", job_id, image)
        return
    from . import keeper

    keeper.stop(held.info)  # before the release: a keeper that saw its record vanish would fence
    held.release()


def _break_dead_records(image: str, job_id: str, key: str | None, state_dir: str | None, io: FileIO) -> None:
    """The job's lease records written on this host during an earlier boot (the node was
    killed and booted again while the job ended): dead whatever their expiry, and closing
    the job's session without them would leave them for nobody (the sweeper starts from
    sessions). Broken here, so the next job on the image need not wait out ttl + grace."""
    import socket

    from sifoverlay.engine import lease, leasestale

    where: dict[str, Any] = {"key": str(key)} if key is not None else {"image_path": image}
    try:
        found = [lease.inspect(**where, state_dir=state_dir), *lease.readers(**where, state_dir=state_dir)]
    except OSError:
        return
    for info in found:
        if info is not None and info.job_id == str(job_id) and info.host == socket.gethostname() \
                and not info.is_alive():
            if leasestale.break_file(info.path, info.inode, io=io):
                log.warning("job %s: broke its lease record of an earlier boot of this node (%s)", job_id,
                            info.describe())


def _lost_lease(session: Any, config: SlurmConfig) -> str | None:
    """Why the job's lease is no longer its own (broken or retaken since the Prolog took
    it), or None. Sessions of older Prologs carry no token: never judged lost."""
    from sifoverlay.engine import lease

    token, key = session.details.get("token"), session.details.get("key")
    if not token or not key:
        return None
    try:
        current = [lease.inspect(key=str(key), state_dir=config.state_dir),
                   *lease.readers(key=str(key), state_dir=config.state_dir)]
    except OSError as exc:
        log.warning("job %s: cannot read its lease: %s", session.job_id, exc)
        return None
    if any(info is not None and info.token == token for info in current):
        return None
    holder = current[0]
    return f"now held by {holder.describe()}" if holder is not None else "the lease record is gone"


def _teardown_quietly(job_id: str, config: SlurmConfig) -> None:
    try:
        from sifoverlay import runtime

        runtime.teardown(job_id, base_dir=config.mounts_dir)
    except Exception:
        log.exception("job %s: teardown of leftovers failed", job_id)
