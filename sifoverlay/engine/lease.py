"""Single-writer lease on an OCI-SIF image: a lease file beside the image plus an OFD
byte-range lock over the ext3 region.

Two locks, because each covers what the other cannot (crash-safety.md R13):

* The lease file ``.<image name>.sifoverlay-lease`` is the cross-node lock. It is created
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
reader file ``.<image name>.sifoverlay-lease.r.<token>``; readers never conflict with
each other. A writer and a reader each create their own file first and then look for the
other's, backing off on conflict, so at least one of two racing parties sees the other.

Stale rule (a lease may be broken only when ALL of this holds):
  1. it is expired: ``now > heartbeat + ttl``; and
  2. on the same host (same host name): the holder process is gone — its pid does not
     exist, or exists with another start time (pid reuse), or the boot_id differs (the
     node rebooted); on another host: it is expired by more than ``grace`` seconds
     (default ``DEFAULT_GRACE``), because we cannot see that host's processes.
  An unreadable/torn lease file is judged by its mtime as if it were the heartbeat.
Breaking is race-free: the stale file is renamed to a unique tomb name (only one breaker
can win that rename); the breaker then checks that the tomb is the very inode it judged
(a heartbeat in between replaces the inode) and puts it back otherwise; then it acquires
normally, through link().

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

import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sifoverlay.errors import ImageBusy
from sifoverlay.fsio import REAL_IO, FileIO

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_TTL",
    "Holder",
    "Lease",
    "LeaseInfo",
    "acquire",
    "acquire_shared",
    "break_stale",
    "inspect",
    "lease_path",
    "readers",
    "resume",
]

log = logging.getLogger(__name__)

DEFAULT_TTL = 300.0  # seconds a lease lives without a heartbeat
DEFAULT_GRACE = 600.0  # extra seconds before a lease of ANOTHER host may be broken
_POLL = 0.25

Region = tuple[int, int]  # (offset, size) of the locked byte range; size 0 = to EOF


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
        return cls(socket.gethostname(), pid, str(job_id), source, os.getuid(), process_start_ticks(pid))


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease (or reader) record as read from disk, plus where it lives."""

    path: str
    inode: int
    host: str
    pid: int
    job_id: str
    source: str
    uid: int | None
    started: int | None
    acquired: float
    heartbeat: float
    expires: float
    ttl: float
    boot_id: str | None
    mode: str
    token: str
    region: Region | None
    record: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_record(cls, record: dict[str, Any], path: str, inode: int) -> LeaseInfo:
        region = record.get("region")
        heartbeat = float(record.get("heartbeat", record.get("acquired", 0.0)))
        ttl = float(record.get("ttl", DEFAULT_TTL))
        return cls(
            path=path, inode=inode, host=str(record.get("host", "?")), pid=int(record.get("pid", 0)),
            job_id=str(record.get("job_id", "?")), source=str(record.get("source", "?")),
            uid=record.get("uid"), started=record.get("started"),
            acquired=float(record.get("acquired", heartbeat)), heartbeat=heartbeat,
            expires=float(record.get("expires", heartbeat + ttl)), ttl=ttl,
            boot_id=record.get("boot_id"), mode=str(record.get("mode", "exclusive")),
            token=str(record.get("token", "")),
            region=(int(region[0]), int(region[1])) if isinstance(region, list) and len(region) == 2 else None,
            record=dict(record),
        )

    @property
    def alive(self) -> bool:
        """The stale rule of the module docstring, judged now, with the default grace."""
        return self.is_alive()

    def is_alive(self, *, grace: float = DEFAULT_GRACE, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now <= self.expires:
            return True
        if self.host != socket.gethostname():
            return now <= self.expires + grace
        if self.boot_id is not None and self.boot_id != boot_id():
            return False
        return _process_alive(self.pid, self.started)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.acquired))
        return f"job {self.job_id} ({self.source}) on host {self.host} pid {self.pid} since {since}"

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "record"}
        out["region"] = list(self.region) if self.region else None
        out["alive"] = self.alive
        return out


def lease_path(image_path: str | os.PathLike[str]) -> str:
    """The lease file of an image: ``.<image name>.sifoverlay-lease`` in its directory."""
    image = os.path.abspath(os.fspath(image_path))
    return os.path.join(os.path.dirname(image), f".{os.path.basename(image)}.sifoverlay-lease")


def inspect(image_path: str | os.PathLike[str]) -> LeaseInfo | None:
    """The writer lease of an image, or None. Never modifies anything."""
    return _read_info(lease_path(image_path))


def readers(image_path: str | os.PathLike[str]) -> list[LeaseInfo]:
    """Reader (``:ro``) leases of an image, oldest first."""
    base = lease_path(image_path)
    directory, prefix = os.path.dirname(base), os.path.basename(base) + ".r."
    found = []
    for name in os.listdir(directory):
        if name.startswith(prefix):
            info = _read_info(os.path.join(directory, name))
            if info is not None:
                found.append(info)
    return sorted(found, key=lambda i: i.acquired)


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _process_alive(pid: int, started: int | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if started is None:
        return True
    now_started = process_start_ticks(pid)
    return now_started is None or now_started == started


# --- lease files -------------------------------------------------------------------------------
def _read_info(path: str) -> LeaseInfo | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.pread(fd, 65536, 0)
    finally:
        os.close(fd)
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except ValueError:
        # Torn or foreign content: judge it by its mtime, holder unknown.
        log.warning("%s: unreadable lease record, judging it by its mtime", path)
        record = {"host": "?", "pid": 0, "job_id": "?", "source": "unknown",
                  "acquired": st.st_mtime, "heartbeat": st.st_mtime, "ttl": DEFAULT_TTL}
    return LeaseInfo.from_record(record, path, st.st_ino)


def _temp_name(target: str, kind: str) -> str:
    directory, name = os.path.split(target)
    return os.path.join(directory, f"{name}.{kind}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")


def _write_record(path: str, record: dict[str, Any], io: FileIO) -> None:
    """A new file holding the record, fsynced (O_EXCL: temp names are unique)."""
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        io.pwrite(fd, data, 0)
        io.fsync(fd)
    finally:
        io.close(fd)


def _link_record(target: str, record: dict[str, Any], io: FileIO) -> bool:
    """Create `target` holding `record` iff the name is free. True when we created it."""
    tmp = _temp_name(target, "new")
    _write_record(tmp, record, io)
    try:
        io.link(tmp, target)
        created = True
    except FileExistsError:
        created = False
    except OSError:
        # NFS may report an error for a link that did happen: trust the link count.
        created = os.stat(tmp).st_nlink == 2
        if not created:
            _unlink_quietly(tmp, io)
            raise
    _unlink_quietly(tmp, io)
    io.fsync_dir(os.path.dirname(target))
    return created


def _sweep_temp_files(image: str, io: FileIO) -> list[str]:
    """Remove temp/tomb files that a killed acquirer, heartbeat or breaker left behind:
    on this host when their process is gone, from other hosts when older than ttl+grace."""
    base = lease_path(image)
    directory, prefix = os.path.dirname(base), os.path.basename(base) + "."
    removed = []
    now, me = time.time(), socket.gethostname()
    for name in os.listdir(directory):
        parts = name[len(prefix):].rsplit(".", 3) if name.startswith(prefix) else []
        if len(parts) != 4 or parts[0] not in ("new", "hb", "tomb") or not parts[2].isdigit():
            continue
        _, host, pid, _ = parts
        path = os.path.join(directory, name)
        try:
            age = now - os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        if (host == me and not _process_alive(int(pid), None)) or (host != me and age > DEFAULT_TTL + DEFAULT_GRACE):
            _unlink_quietly(path, io)
            removed.append(name)
    return removed


def _unlink_quietly(path: str, io: FileIO) -> None:
    try:
        io.unlink(path)
    except FileNotFoundError:
        pass


def _break_file(path: str, inode: int, io: FileIO) -> bool:
    """Remove the lease file at `path` if it is still inode `inode`: rename it to a unique
    tomb (only one of several breakers wins), check the tomb is the inode that was judged,
    put it back if it is not (a heartbeat or a new holder got in between)."""
    tomb = _temp_name(path, "tomb")
    try:
        io.rename(path, tomb)
    except FileNotFoundError:
        return False
    if os.stat(tomb).st_ino != inode:
        try:
            io.link(tomb, path)
        except FileExistsError:
            log.error("%s: could not restore a lease moved aside while breaking", path)
        _unlink_quietly(tomb, io)
        io.fsync_dir(os.path.dirname(path))
        return False
    _unlink_quietly(tomb, io)
    io.fsync_dir(os.path.dirname(path))
    return True


def _remove_if_ours(path: str, token: str, io: FileIO) -> bool:
    info = _read_info(path)
    if info is None or info.token != token:
        return False
    return _break_file(path, info.inode, io)


def _overlay_region(image: str, fd: int) -> Region:
    """(offset, size) of the ext3 overlay, read through `fd`; whole file without one."""
    from sifoverlay.ocisif import open_image  # image model layer: imported only when needed
    from sifoverlay.sif.load import SifFile

    sif = SifFile.from_fd(os.dup(fd), image)
    try:
        overlay = open_image(sif).overlay
    finally:
        sif.close()
    return (0, 0) if overlay is None else (overlay.offset, overlay.size)


class Lease:
    """A held lease. Use as a context manager or call `release()` (idempotent)."""

    def __init__(self, image: str, info: LeaseInfo, file_path: str, lock_fd: int | None, io: FileIO) -> None:
        self.image = image
        self.info = info
        self.file_path = file_path  # lease file (exclusive) or reader file (shared)
        self.lock_fd = lock_fd  # fd holding the OFD lock; None for a resumed lease
        self._io = io
        self._released = False

    @property
    def token(self) -> str:
        return self.info.token

    @property
    def shared(self) -> bool:
        return self.info.mode == "shared"

    @property
    def released(self) -> bool:
        return self._released

    def heartbeat(self, *, ttl: float | None = None) -> LeaseInfo:
        """Extend the expiry: the record is rewritten (temp + rename) after checking that
        the file under the lease name is still ours. Raises ImageBusy if it is not."""
        current = _read_info(self.file_path)
        if self._released or current is None or current.token != self.token:
            other = f"; {current.describe()}" if current is not None and current.token != self.token else ""
            raise ImageBusy(self.image, f"lease lost{other}", holder=current.as_dict() if current else None)
        now = time.time()
        new_ttl = self.info.ttl if ttl is None else float(ttl)
        record = dict(current.record, heartbeat=now, expires=now + new_ttl, ttl=new_ttl)
        tmp = _temp_name(self.file_path, "hb")
        _write_record(tmp, record, self._io)
        try:
            self._io.rename(tmp, self.file_path)
        except BaseException:
            _unlink_quietly(tmp, self._io)
            raise
        self._io.fsync_dir(os.path.dirname(self.file_path))
        self.info = LeaseInfo.from_record(record, self.file_path, os.stat(self.file_path).st_ino)
        return self.info

    def unlock_range(self) -> None:
        """Drop only the byte-range lock, keeping the lease file (e.g. before handing the
        image to engine.sync under this lease: its quiesce check sees any held lock)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def release(self) -> bool:
        """Remove our lease/reader file if it is still ours and drop the byte-range lock.
        Returns True when a file was removed; safe to call any number of times."""
        if self._released:
            return False
        removed = _remove_if_ours(self.file_path, self.token, self._io)
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
) -> Lease:
    """Take the exclusive (writer) lease. `wait=None` refuses at once when held; with
    `wait=seconds` it polls until free or the time is up. `region` = (offset, size) of
    the ext3 overlay; looked up with sifoverlay.ocisif when omitted. `image_fd`: an fd
    the caller opened (O_NOFOLLOW) — it is reopened through /proc/self/fd so the lock
    lands on that very inode even if the path was swapped since."""
    return _acquire(os.fspath(image_path), holder, "exclusive", ttl, wait, region, image_fd, grace, io)


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
) -> Lease:
    """Take a reader lease (``:ro`` jobs): never conflicts with other readers, conflicts
    with a writer in both directions."""
    return _acquire(os.fspath(image_path), holder, "shared", ttl, wait, region, image_fd, grace, io)


def _acquire(
    image: str, holder: Holder, mode: str, ttl: float, wait: float | None,
    region: Region | None, image_fd: int | None, grace: float, io: FileIO,
) -> Lease:
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if holder.started is None and holder.host == socket.gethostname():
        holder = Holder(holder.host, holder.pid, holder.job_id, holder.source, holder.uid,
                        process_start_ticks(holder.pid))
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        try:
            return _try_once(image, holder, mode, ttl, region, image_fd, grace, io)
        except ImageBusy:
            if deadline is None or time.monotonic() >= deadline:
                raise
        time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))


def _try_once(
    image: str, holder: Holder, mode: str, ttl: float, region: Region | None,
    image_fd: int | None, grace: float, io: FileIO,
) -> Lease:
    lock_fd = _open_for_lock(image, image_fd, mode, io)
    try:
        if region is None:
            region = _overlay_region(image, lock_fd)
        _ofd_lock(image, lock_fd, region, exclusive=(mode == "exclusive"))
        now = time.time()
        record: dict[str, Any] = {
            "version": 1, **asdict(holder), "job_id": str(holder.job_id), "acquired": now,
            "heartbeat": now, "expires": now + ttl, "ttl": float(ttl), "boot_id": boot_id(),
            "mode": mode, "token": secrets.token_hex(16), "region": list(region), "image": image,
        }
        if mode == "exclusive":
            file_path = _create_writer_file(image, record, grace, io)
        else:
            file_path = _create_reader_file(image, record, grace, io)
        info = LeaseInfo.from_record(record, file_path, os.stat(file_path).st_ino)
        log.debug("acquired %s lease on %s for %s", mode, image, info.describe())
        return Lease(image, info, file_path, lock_fd, io)
    except BaseException:
        os.close(lock_fd)
        raise


def _create_writer_file(image: str, record: dict[str, Any], grace: float, io: FileIO) -> str:
    target = lease_path(image)
    for _ in range(3):  # link, or break a stale holder and link again
        if _link_record(target, record, io):
            break
        current = inspect(image)
        if current is None:
            continue  # released between our link and our look
        if current.is_alive(grace=grace) or not break_stale(image, grace=grace, io=io):
            raise ImageBusy(image, f"held by {current.describe()}", holder=current.as_dict())
    else:
        current = inspect(image)
        who = current.describe() if current else "a concurrent acquirer"
        raise ImageBusy(image, f"held by {who}", holder=current.as_dict() if current else None)
    _sweep_temp_files(image, io)
    # Writers must not coexist with live readers on other nodes (same node: the OFD lock).
    for reader in readers(image):
        if reader.is_alive(grace=grace):
            _remove_if_ours(target, record["token"], io)
            raise ImageBusy(image, f"held read-only by {reader.describe()}", holder=reader.as_dict())
        _break_file(reader.path, reader.inode, io)
    return target


def _create_reader_file(image: str, record: dict[str, Any], grace: float, io: FileIO) -> str:
    path = f"{lease_path(image)}.r.{record['token']}"
    if not _link_record(path, record, io):  # token is random: cannot happen twice
        raise ImageBusy(image, "reader lease name collision", holder=None)
    writer = inspect(image)
    if writer is not None and (writer.is_alive(grace=grace) or not break_stale(image, grace=grace, io=io)):
        _remove_if_ours(path, record["token"], io)
        raise ImageBusy(image, f"held by {writer.describe()}", holder=writer.as_dict())
    return path


def break_stale(image_path: str | os.PathLike[str], *, grace: float = DEFAULT_GRACE, io: FileIO = REAL_IO) -> bool:
    """Remove the writer lease of `image_path` if it is stale by the module's rule.
    Returns True when this call removed it; False when there was none, it is live, or
    another breaker/heartbeat won the race."""
    image = os.fspath(image_path)
    info = inspect(image)
    if info is None or info.is_alive(grace=grace):
        return False
    log.warning("%s: breaking stale lease %s", image, info.describe())
    return _break_file(info.path, info.inode, io)


def resume(image_path: str | os.PathLike[str], job_id: str, *, io: FileIO = REAL_IO) -> Lease | None:
    """The lease of `job_id` on `image_path` as a `Lease` object, for a process other than
    the one that acquired it (Slurm: Prolog acquires, Epilog releases). Holds no
    byte-range lock. None when the job holds no lease there."""
    image = os.fspath(image_path)
    info = inspect(image)
    if info is not None and info.job_id == str(job_id):
        return Lease(image, info, info.path, None, io)
    for reader in readers(image):
        if reader.job_id == str(job_id):
            return Lease(image, reader, reader.path, None, io)
    return None


# --- the byte-range lock ------------------------------------------------------------------------
_FLOCK = "hhqqi4x"  # struct flock on LP64 Linux: l_type, l_whence, l_start, l_len, l_pid
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _open_for_lock(image: str, image_fd: int | None, mode: str, io: FileIO) -> int:
    # A write lock needs a description opened for writing (else EBADF); nothing is written.
    flags = (os.O_RDWR if mode == "exclusive" else os.O_RDONLY) | os.O_CLOEXEC
    if image_fd is not None:
        return io.open(f"/proc/self/fd/{image_fd}", flags)
    return io.open(image, flags | os.O_NOFOLLOW)


def _ofd_lock(image: str, fd: int, region: Region, *, exclusive: bool) -> None:
    offset, size = region
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, size, 0))
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        who, holder = _lock_holder(image, fd, region, ltype)
        raise ImageBusy(image, f"held {who}", holder=holder) from None


def _lock_holder(image: str, fd: int, region: Region, ltype: int) -> tuple[str, dict[str, Any] | None]:
    """Name whoever holds a conflicting byte-range lock: our lease record if there is
    one, else the pid the kernel reports (POSIX locks: e.g. SingularityCE native mode)."""
    for _ in range(20):  # an OFD holder may be between its lock and its link(): let it finish
        info = inspect(image)
        if info is not None:
            return f"by {info.describe()}", info.as_dict()
        for reader in readers(image):
            return f"read-only by {reader.describe()}", reader.as_dict()
        time.sleep(0.05)
    offset, size = region
    raw = fcntl.fcntl(fd, _F_OFD_GETLK, struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, size, 0))
    kind, _, _, _, pid = struct.unpack(_FLOCK, raw)
    what = "write" if kind == fcntl.F_WRLCK else "read"
    holder = {"host": socket.gethostname(), "pid": pid if pid > 0 else None, "lock": what}
    if pid > 0:
        return f"by pid {pid} on this host ({what} byte-range lock on the overlay, no lease file: e.g. singularity)", holder
    return f"by another open file on this host ({what} OFD lock on the overlay, no lease file)", holder
