"""The Prolog's word to the job's tasks: ``<runtime_dir>/slurm/<job>/state``.

The C plugin (slurmstepd, task_init_privileged) reads it to either chroot the task into
the assembled rootfs or fail it with the refusal. A refused Prolog still exits 0 (a
failing Prolog drains the node): this file is how the refusal reaches the job's stderr.

Format (key=value lines, one line each, no newlines inside values)::

    status=preparing|ready|refused
    image=/abs/path/img.oci.sif                    (canonical: directories resolved)
    requested=/link/to/img.oci.sif                 (as the user gave it)
    rootfs=/run/sifoverlay/mounts/<job>/rootfs     (ready)
    mode=rw|ro
    message=<image>: <problem>                     (refused)
    preparer=<pid>:<start ticks>                   (preparing)

``preparing``: the Prolog has authorized the job and taken its lease, and exited so that
slurmd can start the job while its mounter (the Prolog's detached child, the process named
by ``preparer``; plugstack prolog_mounts=detached) mounts the rootfs. The mounter rewrites
the record ``ready`` or ``refused``; the plugin waits for that while the mounter lives (its
pid and /proc start time, on this node's kernel) and fails the task if it died first.

Root writes it atomically in a root-owned 0755 directory; the plugin believes only a
root-owned file that nobody else can write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Final

from sifoverlay.errors import UsageError
from sifoverlay.fsio import REAL_IO, FileIO

__all__ = ["JobRecord", "job_dir", "list_jobs", "read", "remove", "wait_for_preparer", "write_preparing", "write_ready", "write_refused"]

log = logging.getLogger(__name__)

STATE_FILE: Final = "state"
PREPARER_WAIT: Final = 60.0  # seconds a job end waits for a mounter still mounting
_JOB_ID: Final = re.compile(r"^[0-9]{1,12}$")


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    status: str  # "preparing" | "ready" | "refused"
    image: str
    mode: str = ""
    rootfs: str = ""
    message: str = ""
    requested: str = ""
    preparer: str = ""  # "<pid>:<start ticks>" of the mounter (preparing)

    def preparer_process(self) -> tuple[int, int] | None:
        """(pid, start ticks) of the mounter of a preparing record; None when malformed."""
        pid, _, started = self.preparer.partition(":")
        if not (pid.isdigit() and started.isdigit()):
            return None
        return int(pid), int(started)


def job_dir(records_dir: str, job_id: str) -> str:
    if not _JOB_ID.match(str(job_id)):
        raise UsageError(None, f"Slurm job id {job_id!r} is not a number")
    return os.path.join(records_dir, str(job_id))


def _one_line(value: str) -> str:
    return " ".join(str(value).split())


def _write(records_dir: str, record: JobRecord, io: FileIO) -> str:
    directory = job_dir(records_dir, record.job_id)
    io.makedirs(records_dir, 0o755)
    io.makedirs(directory, 0o755)
    io.chmod(directory, 0o755)  # whatever the umask: the plugin refuses group/other-writable
    fields = [("status", record.status), ("image", record.image), ("requested", record.requested),
              ("mode", record.mode), ("rootfs", record.rootfs), ("message", record.message),
              ("preparer", record.preparer)]
    text = "".join(f"{key}={_one_line(value)}\n" for key, value in fields if value)
    path = os.path.join(directory, STATE_FILE)
    io.write_file_atomic(path, text.encode(), mode=0o644)
    return path


def write_preparing(records_dir: str, job_id: str, image: str, mode: str, *, requested: str = "",
                    preparer: tuple[int, int], io: FileIO = REAL_IO) -> str:
    pid, started = preparer
    return _write(records_dir, JobRecord(str(job_id), "preparing", image, mode=mode, requested=requested,
                                         preparer=f"{pid}:{started}"), io)


def write_ready(records_dir: str, job_id: str, image: str, mode: str, rootfs: str, *, requested: str = "",
                io: FileIO = REAL_IO) -> str:
    return _write(records_dir, JobRecord(str(job_id), "ready", image, mode=mode, rootfs=rootfs,
                                         requested=requested), io)


def write_refused(records_dir: str, job_id: str, image: str, message: str, *, io: FileIO = REAL_IO) -> str:
    return _write(records_dir, JobRecord(str(job_id), "refused", image, message=message), io)


def read(records_dir: str, job_id: str) -> JobRecord | None:
    path = os.path.join(job_dir(records_dir, job_id), STATE_FILE)
    from sifoverlay.fsio import open_regular

    try:
        fd = open_regular(path, os.O_RDONLY)  # O_NOFOLLOW|O_NONBLOCK, regular files only
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("%s: not a job record (%s): ignored", path, exc.strerror)
        return None
    try:
        raw = os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)
    values = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
    return JobRecord(str(job_id), values.get("status", ""), values.get("image", ""),
                     mode=values.get("mode", ""), rootfs=values.get("rootfs", ""),
                     message=values.get("message", ""), requested=values.get("requested", ""),
                     preparer=values.get("preparer", ""))


def wait_for_preparer(records_dir: str, job_id: str, *, timeout: float = PREPARER_WAIT) -> JobRecord | None:
    """A job end on this node while the job's mounter may still be mounting (the job was
    cancelled at once, or a task failed early): wait for the mounter to finish, so that
    the teardown sees every mount it made; past `timeout` it is killed (its pid and start
    time come from root's own record: it cannot name another process). Returns the record
    as it is then."""
    import signal
    import time

    from sifoverlay.engine.procs import process_alive

    record = read(records_dir, job_id)
    mounter = record.preparer_process() if record is not None and record.status == "preparing" else None
    if mounter is None:
        return record
    pid, started = mounter
    deadline, killed, delay = time.monotonic() + timeout, False, 0.002
    while process_alive(pid, started):
        if time.monotonic() >= deadline:
            if killed:  # SIGKILLed 5 s ago and still there (uninterruptible): go on without it
                log.error("job %s: its Prolog's mounter (pid %s) did not die", job_id, pid)
                break
            log.error("job %s: its Prolog's mounter (pid %s) is still mounting after %.0fs: killing it",
                      job_id, pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return read(records_dir, job_id)


def remove(records_dir: str, job_id: str, *, io: FileIO = REAL_IO) -> None:
    """Drop the job's record and its directory (idempotent)."""
    directory = job_dir(records_dir, job_id)
    if not os.path.isdir(directory) or os.path.islink(directory):
        return
    for name in os.listdir(directory):  # the state file, and temp files of a killed write
        try:
            io.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(directory)  # io-seam: exempt (per-job record dir in runtime_dir; FileIO has no rmdir)
    except FileNotFoundError:
        pass


def list_jobs(records_dir: str) -> list[str]:
    try:
        names = os.listdir(records_dir)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if _JOB_ID.match(n)), key=int)
