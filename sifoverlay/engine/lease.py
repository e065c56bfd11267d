"""Single-writer lease on an OCI-SIF image: a lease file beside the image plus an OFD
byte-range lock over the ext3 region.

Two locks, because each covers what the other cannot (crash-safety.md R13):

* The lease file ``<state dir>/leases/<key>.lease`` is the cross-node lock (the state
  directory is root's, or the caller's own, never the image's directory; `<key>` is the
  image's identity: engine/statedir.py, docs/security.md). It is created
  atomically by writing a complete record to a unique temp file and ``link()``-ing it to
  the lease name: link fails with EEXIST when the name is taken, on local filesystems and
  on NFS alike (where O_EXCL historically was not). The record is JSON: host, pid, job_id,
  source, uid, started, acquired, heartbeat, expires, ttl, boot_id, mode, token, region.
* An OFD write lock (``F_OFD_SETLK``) over ``[offset, offset+size)`` of the ext3 region,
  held on an open fd for the life of the lease. SingularityCE native mode takes a POSIX
  ``F_SETLK`` lock on the same range; OFD and POSIX record locks conflict with each other,
  so the two tools exclude each other on one node. When the image has no overlay the
  whole file is locked.

Readers (``acquire_shared``, for ``:ro`` jobs) take an OFD *read* lock and write their own
reader file ``<key>.lease.r.<token>``; readers never conflict with
each other. A writer and a reader each create their own file first and then look for the
other's, backing off on conflict, so at least one of two racing parties sees the other.

A writer whose job is over and whose ext3 is unmounted and clean, only hashed and committed
now (the Slurm job end's reconcile worker), marks its lease ``phase: "reconciling"``
(`Lease.set_phase`): readers are admitted beside it, since the overlay's bytes no longer
change; writers still are not. Readers parse the metadata under leaselock.metadata_lock,
which the commit takes too.

Stale rule and breaking: engine/leasestale.py. Record I/O: engine/leasefile.py. The
byte-range lock: engine/leaselock.py. This module is the public facade.

For integrations whose acquiring process exits before the job ends (Slurm: the Prolog
acquires, the Epilog releases through `resume(image, job_id)`): record as holder pid a
process that lives as long as the job, or a ttl covering the job's time limit, or keep
heartbeating - otherwise the lease turns breakable once expired. The byte-range lock
lives as long as its open file description: hand `Lease.lock_fd` to a long-lived process
(runtime.assemble(hold_fds=...) gives it to the ext3 FUSE daemon).

Every refusal raises `ImageBusy` whose message names the holder, e.g.
``held by job 1234 (slurm) on host node1 pid 5678 since 2026-11-28T09:00:00Z``.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from sifoverlay.errors import ImageBusy
from sifoverlay.fsio import REAL_IO, FileIO

from . import leaselock
from .leasefile import (
    DEFAULT_GRACE, DEFAULT_TTL, LeaseInfo, Region, lease_path, lease_paths, link_record, read_info, reader_infos,
    replace_record,
)
from .leasestale import break_file, remove_if_ours, sweep_temp_files
from .procs import boot_id, process_start_ticks

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_TTL",
    "Holder",
    "Lease",
    "LeaseInfo",
    "READERS_ADMITTED",
    "acquire",
    "acquire_shared",
    "admits_readers",
    "break_stale",
    "boot_id",
    "held_here",
    "held_lock_fd",
    "inspect",
    "lease_path",
    "process_start_ticks",
    "readers",
    "resume",
]

log = logging.getLogger(__name__)

_POLL = 0.25
_HELD: weakref.WeakSet[Lease] = weakref.WeakSet()  # leases of this process that hold a lock


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds (or wants) the lease. `started` is the holder process's start time in
    clock ticks since boot (/proc/<pid>/stat field 22): with boot_id it tells a live
    holder from a recycled pid. It is filled in for the current process when omitted."""

    host: str
    pid: int
    job_id: str
    source: str  # "slurm" | "k8s" | "cli" | ...
    uid: int = field(default_factory=os.getuid)
    started: int | None = None

    @classmethod
    def current(cls, job_id: str, source: str = "cli") -> Holder:
        pid = os.getpid()
        return cls(os.uname().nodename, pid, str(job_id), source, os.getuid(), process_start_ticks(pid))


def inspect(image_path: str | os.PathLike[str] | None = None, *, image_fd: int | None = None,
            key: str | None = None, state_dir: str | None = None) -> LeaseInfo | None:
    """The writer lease of an image, or None. Never modifies anything. The image is named
    by `key`, an open `image_fd`, or a path opened with statedir.open_image_checked."""
    for path in lease_paths(image_path, fd=image_fd, key=key, state_dir=state_dir):
        info = read_info(path)
        if info is not None:
            return info
    return None


def readers(image_path: str | os.PathLike[str] | None = None, *, image_fd: int | None = None,
            key: str | None = None, state_dir: str | None = None) -> list[LeaseInfo]:
    """Reader (``:ro``) leases of an image, oldest first."""
    return reader_infos(lease_paths(image_path, fd=image_fd, key=key, state_dir=state_dir))


def held_lock_fd(image_path: str | os.PathLike[str] | None, job_id: str, *, image_fd: int | None = None) -> int | None:
    """The fd through which THIS process holds `job_id`'s byte-range lock on the image,
    or None. quiesce probes through it, so the caller's own lock is not activity."""
    try:
        st = os.fstat(image_fd) if image_fd is not None else os.stat(image_path)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
    for held in list(_HELD):
        fd = held.lock_fd
        if fd is None or held.released or held.info.job_id != str(job_id):
            continue
        try:
            mine = os.fstat(fd)
        except OSError:
            continue
        if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
            return fd
    return None


class Lease:
    """A held lease. Use as a context manager or call `release()` (idempotent)."""

    def __init__(self, image: str, info: LeaseInfo, file_path: str, lock_fd: int | None, io: FileIO) -> None:
        self.image = image
        self.info = info
        self.file_path = file_path  # lease file (exclusive) or reader file (shared)
        self.lock_fd = lock_fd  # fd holding the OFD lock; None for a resumed lease
        self._io = io
        self._released = False
        if lock_fd is not None:
            _HELD.add(self)

    @property
    def token(self) -> str:
        return self.info.token

    @property
    def shared(self) -> bool:
        return self.info.mode == "shared"

    @property
    def released(self) -> bool:
        return self._released

    @property
    def key(self) -> str:
        """The image's identity key (the lease file's name without suffix)."""
        return os.path.basename(self.file_path).split(".", 1)[0]

    def heartbeat(self, *, ttl: float | None = None, keeper: bool = False) -> LeaseInfo:
        """Extend the expiry: the record is rewritten (temp + rename) after checking that
        the file under the lease name is still ours. Raises ImageBusy if it is not.
        `keeper`: the calling process becomes the recorded holder (pid, start time, host,
        boot_id): a lease keeper that outlives the acquiring process (engine/leasekeeper.py)."""
        current = read_info(self.file_path)
        if self._released or current is None or current.token != self.token:
            other = f"; {current.describe()}" if current is not None and current.token != self.token else ""
            raise ImageBusy(self.image, f"lease lost{other}", holder=current.as_dict() if current else None)
        now = time.time()
        new_ttl = self.info.ttl if ttl is None else float(ttl)
        record = dict(current.record, heartbeat=now, expires=now + new_ttl, ttl=new_ttl)
        if keeper:
            pid = os.getpid()
            record.update(pid=pid, started=process_start_ticks(pid), host=os.uname().nodename,
                          boot_id=boot_id(), keeper=True)
        self.info = replace_record(self.file_path, record, io=self._io)
        return self.info

    def set_phase(self, phase: str | None) -> LeaseInfo:
        """Record the holder's phase (READERS_ADMITTED, or None to clear it), checking that
        the file is still ours like `heartbeat`. A heartbeat racing with this may write its
        older copy back: read back and retry; a phase still lost leaves readers out (safe)."""
        for _ in range(5):
            current = read_info(self.file_path)
            if self._released or current is None or current.token != self.token:
                raise ImageBusy(self.image, "lease lost", holder=current.as_dict() if current else None)
            record = {k: v for k, v in current.record.items() if k != "phase"}
            if phase is not None:
                record["phase"] = phase
            self.info = replace_record(self.file_path, record, io=self._io)
            time.sleep(0.01)  # a heartbeat in flight lands before the check below
            again = read_info(self.file_path)
            if again is not None and again.token == self.token and again.record.get("phase") == phase:
                return again
        log.warning("%s: lease phase %s could not be recorded (heartbeats raced): readers stay out", self.image,
                    phase)
        return self.info

    def unlock_range(self) -> None:
        """Drop only the byte-range lock, keeping the lease file. engine.sync(job=) no
        longer needs this: quiesce ignores the lock this process holds for that job."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def release(self) -> bool:
        """Remove our lease/reader file if it is still ours and drop the byte-range lock.
        Returns True when a file was removed; safe to call any number of times."""
        if self._released:
            return False
        removed = remove_if_ours(self.file_path, self.token, io=self._io)
        self.unlock_range()  # closing the last fd of the description drops the OFD lock
        self._released = True
        log.debug("released lease on %s (%s)", self.image, self.info.describe())
        return removed

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.image!r}, {self.info.describe()}, mode={self.info.mode})"


# --- acquisition -----------------------------------------------------------------------------
def acquire(
    image_path: str | os.PathLike[str],
    holder: Holder,
    *,
    ttl: float = DEFAULT_TTL,
    wait: float | None = None,
    region: Region | None = None,
    image_fd: int | None = None,
    grace: float = DEFAULT_GRACE,
    io: FileIO = REAL_IO,
    state_dir: str | None = None,
) -> Lease:
    """Take the exclusive (writer) lease. `wait=None` refuses at once when held; with
    `wait=seconds` it polls until free or the time is up. `region` = (offset, size) of
    the ext3 overlay; looked up with sifoverlay.ocisif when omitted. `image_fd`: an fd
    the caller opened (O_NOFOLLOW) — it is reopened through /proc/self/fd so the lock
    lands on that very inode even if the path was swapped since."""
    return _acquire(os.fspath(image_path), holder, "exclusive", ttl, wait, region, image_fd, grace, io, state_dir)


def acquire_shared(
    image_path: str | os.PathLike[str],
    holder: Holder,
    *,
    ttl: float = DEFAULT_TTL,
    wait: float | None = None,
    region: Region | None = None,
    image_fd: int | None = None,
    grace: float = DEFAULT_GRACE,
    io: FileIO = REAL_IO,
    state_dir: str | None = None,
) -> Lease:
    """Take a reader lease (``:ro`` jobs): never conflicts with other readers, conflicts
    with a writer in both directions."""
    return _acquire(os.fspath(image_path), holder, "shared", ttl, wait, region, image_fd, grace, io, state_dir)


def _acquire(
    image: str, holder: Holder, mode: str, ttl: float, wait: float | None,
    region: Region | None, image_fd: int | None, grace: float, io: FileIO, state_dir: str | None = None,
) -> Lease:
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if holder.started is None and holder.host == os.uname().nodename:
        holder = Holder(holder.host, holder.pid, holder.job_id, holder.source, holder.uid,
                        process_start_ticks(holder.pid))
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        try:
            return _try_once(image, holder, mode, ttl, region, image_fd, grace, io, state_dir)
        except ImageBusy:
            if deadline is None or time.monotonic() >= deadline:
                raise
        time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))


def _try_once(
    image: str, holder: Holder, mode: str, ttl: float, region: Region | None,
    image_fd: int | None, grace: float, io: FileIO, state_dir: str | None = None,
) -> Lease:
    from . import statedir

    exclusive = mode == "exclusive"
    lock_fd = leaselock.open_for_lock(image, image_fd, exclusive=exclusive, io=io)
    try:
        key = statedir.identity_key(lock_fd)
        targets = lease_paths(key=key, state_dir=state_dir)
        target = targets[0]
        statedir.ensure(os.path.dirname(target), io=io)
        if region is None:
            region = leaselock.overlay_region(image, lock_fd)
        locked = leaselock.lock_region(image, lock_fd, region, exclusive=exclusive, targets=targets)
        st = os.fstat(lock_fd)
        now = time.time()
        record: dict[str, Any] = {
            "version": 2, **asdict(holder), "job_id": str(holder.job_id), "acquired": now,
            "heartbeat": now, "expires": now + ttl, "ttl": float(ttl), "boot_id": boot_id(),
            "mode": mode, "token": os.urandom(16).hex(), "region": list(region), "image": image,
            "key": key, "dev": st.st_dev, "ino": st.st_ino, "byte_lock": locked, "grace": float(grace),
        }
        if exclusive:
            file_path = _create_writer_file(image, targets, record, grace, io)
        else:
            file_path = _create_reader_file(image, targets, record, grace, io)
        info = LeaseInfo.from_record(record, file_path, os.stat(file_path).st_ino)
        log.debug("acquired %s lease on %s for %s", mode, image, info.describe())
        return Lease(image, info, file_path, lock_fd, io)
    except BaseException:
        os.close(lock_fd)
        raise


READERS_ADMITTED = "reconciling"  # the writer's phase in which readers may join (module docstring)


def admits_readers(info: LeaseInfo, *, grace: float = DEFAULT_GRACE) -> bool:
    """A live writer lease that readers may join: its holder only hashes and commits."""
    return info.mode == "exclusive" and info.record.get("phase") == READERS_ADMITTED and info.is_alive(grace=grace)


def _busy(image: str, current: LeaseInfo | None, *, what: str = "held") -> ImageBusy:
    who = current.describe() if current is not None else "a concurrent acquirer"
    return ImageBusy(image, f"{what} by {who}", holder=current.as_dict() if current is not None else None)


def _others_live(image: str, targets: list[str], grace: float, *, readers_too: bool) -> LeaseInfo | None:
    """A live holder recorded in the other (read-only to us) state directories that keeps
    us out (`readers_too=False`: a reader asks; a writer admitting readers does not)."""
    for other in targets[1:]:
        info = read_info(other)
        if info is not None and info.is_alive(grace=grace) and (readers_too or not admits_readers(info, grace=grace)):
            return info
        if readers_too:
            for reader in reader_infos(other):
                if reader.is_alive(grace=grace):
                    return reader
    return None


def _create_writer_file(image: str, targets: list[str], record: dict[str, Any], grace: float, io: FileIO) -> str:
    target = targets[0]
    foreign = _others_live(image, targets, grace, readers_too=True)
    if foreign is not None:
        raise _busy(image, foreign, what="held read-only" if foreign.mode == "shared" else "held")
    for _ in range(3):  # link, or break a stale holder and link again
        if link_record(target, record, io=io):
            break
        current = read_info(target)
        if current is None:
            continue  # released between our link and our look
        if current.is_alive(grace=grace) or not _break_stale_at(image, target, grace, io):
            raise _busy(image, current)
    else:
        raise _busy(image, read_info(target))
    sweep_temp_files(target, io=io)
    # Writers must not coexist with live readers on other nodes (same node: the OFD lock).
    for reader in reader_infos(target):
        if reader.is_alive(grace=grace):
            remove_if_ours(target, record["token"], io=io)
            raise _busy(image, reader, what="held read-only")
        break_file(reader.path, reader.inode, io=io)
    return target


def _create_reader_file(image: str, targets: list[str], record: dict[str, Any], grace: float, io: FileIO) -> str:
    target = targets[0]
    foreign = _others_live(image, targets, grace, readers_too=False)
    if foreign is not None:
        raise _busy(image, foreign)
    path = f"{target}.r.{record['token']}"
    if not link_record(path, record, io=io):  # token is random: cannot happen twice
        raise ImageBusy(image, "reader lease name collision", holder=None)
    writer = read_info(target)
    if writer is not None and admits_readers(writer, grace=grace):
        log.info("%s: reader admitted beside %s (phase %s)", image, writer.describe(), READERS_ADMITTED)
    elif writer is not None and (writer.is_alive(grace=grace) or not _break_stale_at(image, target, grace, io)):
        remove_if_ours(path, record["token"], io=io)
        raise _busy(image, writer)
    return path


def _break_stale_at(image: str, target: str, grace: float, io: FileIO) -> bool:
    info = read_info(target)
    if info is None or info.is_alive(grace=grace):
        return False
    log.warning("%s: breaking stale lease %s", image, info.describe())
    return break_file(info.path, info.inode, io=io)


def break_stale(image_path: str | os.PathLike[str] | None = None, *, grace: float = DEFAULT_GRACE,
                io: FileIO = REAL_IO, image_fd: int | None = None, key: str | None = None,
                state_dir: str | None = None) -> bool:
    """Remove the writer lease of the image if it is stale (engine/leasestale.py), in our
    own state directory only. Returns True when this call removed it; False when there
    was none, it is live, or another breaker/heartbeat won the race."""
    target = lease_path(image_path, fd=image_fd, key=key, state_dir=state_dir)
    return _break_stale_at(os.fspath(image_path) if image_path is not None else target, target, grace, io)


def resume(image_path: str | os.PathLike[str] | None, job_id: str, *, io: FileIO = REAL_IO,
           image_fd: int | None = None, key: str | None = None, state_dir: str | None = None) -> Lease | None:
    """The lease of `job_id` on the image as a `Lease` object, for a process other than
    the one that acquired it (Slurm: Prolog acquires, Epilog releases: by `key`, without
    touching the image path). Holds no byte-range lock. None when the job holds none
    HERE: the record must name this host and this boot (boot_id). A job id alone is not
    enough: the other nodes of a multi-node job, or a requeued run on another node (or
    after a reboot), share the id and must not take over this lease (issue 13)."""
    target = lease_path(image_path, fd=image_fd, key=key, state_dir=state_dir)
    image = os.fspath(image_path) if image_path is not None else target
    for info in (read_info(target), *reader_infos(target)):
        if info is not None and info.job_id == str(job_id) and held_here(info):
            return Lease(str(info.record.get("image", image)), info, info.path, None, io)
    return None


def held_here(info: LeaseInfo) -> bool:
    """The record was written on this host during this boot (a missing boot_id on either
    side, e.g. no /proc, compares by host name alone)."""
    if info.host != os.uname().nodename:
        return False
    here = boot_id()
    return info.boot_id is None or here is None or info.boot_id == here
