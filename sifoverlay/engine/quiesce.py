"""Is anyone using the overlay right now? (crash-safety.md R7, R8)

Looks at what this host can see, without changing anything:
  * FUSE mounts in /proc/self/mountinfo whose source is the image (fuse2fs = the ext3,
    squashfuse = a squashfs layer); a fuse2fs mount is a writer unless mounted ro;
  * loop devices whose backing file is the image and whose [offset, sizelimit) overlaps
    the ext3 region (/sys/block/loop*/loop/); writable unless /sys/block/loopN/ro is 1;
  * byte-range locks over the ext3 region held through other open files (F_OFD_GETLK
    sees OFD locks and POSIX locks, e.g. SingularityCE native mode's F_SETLK) - except
    the lock this process holds for `job` (or through `own_lease`): engine.sync(job=)
    runs inside that lease, and the lock should keep others out for the whole sync;
  * the lease file (engine.lease.inspect), when its holder is alive.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sifoverlay.errors import ImageBusy

from . import leaselock, procs

if TYPE_CHECKING:
    from .lease import Lease

log = logging.getLogger(__name__)
# fuse2fs mounts show up as fuse.<fs type from the superblock>, e.g. fuse.ext4.
FUSE_WRITERS = ("fuse2fs", "ext2", "ext3", "ext4")
FUSE_READERS = ("squashfuse", "squashfuse_ll")


@dataclass(frozen=True, slots=True)
class Activity:
    """One sign of use. `writer` = it may change the ext3 bytes."""

    kind: str  # "fuse" (ext3) | "fuse-layer" (squashfs layer) | "loop" | "lock" | "lease"
    detail: str
    writer: bool


def _same_file(candidate: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(candidate)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def fuse_mounts(st: os.stat_result, mountinfo: str = "/proc/self/mountinfo") -> list[Activity]:
    found: list[Activity] = []
    try:
        entries = procs.mountinfo(mountinfo)
    except OSError:
        return found
    for entry in entries:
        fstype = entry.fstype
        program = fstype.split(".", 1)[1] if fstype.startswith("fuse.") else fstype
        if program not in FUSE_WRITERS + FUSE_READERS and fstype != "fuse":
            continue
        if not _same_file(entry.source, st):
            continue  # (a /proc/self/fd/N source is the mounter's fd: see fuse_processes)
        if _dead_mount(entry.target):
            continue  # its daemon is gone: nothing can write through it
        kind = "fuse-layer" if program in FUSE_READERS else "fuse"
        writable = kind == "fuse" and "ro" not in entry.options.split(",")
        found.append(Activity(kind, f"{program} mount at {entry.target} ({'rw' if writable else 'ro'})", writable))
    return found


def _dead_mount(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died answers ENOTCONN."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fuse_processes(st: os.stat_result, proc: str = "/proc") -> list[Activity]:
    """FUSE daemons (fuse2fs, squashfuse) holding the image open: catches mounts whose
    source was given as /proc/self/fd/N, which mountinfo cannot resolve for us."""
    found: list[Activity] = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        comm = _read(os.path.join(proc, pid, "comm"))
        if comm not in ("fuse2fs", "squashfuse", "squashfuse_ll"):
            continue
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            if not _same_file(os.path.join(fd_dir, fd), st):
                continue
            flags = 0
            for line in _read(os.path.join(proc, pid, "fdinfo", fd)).splitlines():
                if line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
            writable = comm == "fuse2fs" and flags & os.O_ACCMODE != os.O_RDONLY
            kind = "fuse" if comm == "fuse2fs" else "fuse-layer"
            found.append(Activity(kind, f"{comm} pid {pid} has the image open ({'rw' if writable else 'ro'})", writable))
            break
    return found


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def loop_devices(st: os.stat_result, offset: int, size: int, sys_block: str = "/sys/block") -> list[Activity]:
    found: list[Activity] = []
    try:
        names = sorted(n for n in os.listdir(sys_block) if n.startswith("loop"))
    except OSError:
        return found
    for name in names:
        base = os.path.join(sys_block, name)
        backing = _read(os.path.join(base, "loop", "backing_file"))
        if not backing:
            continue
        if backing.endswith(" (deleted)") or not _same_file(backing, st):
            continue
        lo_offset = int(_read(os.path.join(base, "loop", "offset")) or 0)
        limit = int(_read(os.path.join(base, "loop", "sizelimit")) or 0)
        lo_end = lo_offset + limit if limit else st.st_size
        if lo_end <= offset or lo_offset >= offset + size:
            continue
        writable = _read(os.path.join(base, "ro")) != "1"
        found.append(Activity("loop", f"/dev/{name} at offset {lo_offset} ({'rw' if writable else 'ro'})", writable))
    return found


def byte_range_lock(path: str, offset: int, size: int, *, writers_only: bool, own_fd: int | None = None) -> list[Activity]:
    """A conflicting lock on [offset, offset+size) held through another open file.
    Probing through `own_fd` (the description holding our own lease's lock) leaves that
    lock out: a description never conflicts with itself."""
    ltype = fcntl.F_RDLCK if writers_only else fcntl.F_WRLCK
    try:
        if own_fd is not None:
            found = leaselock.probe(own_fd, offset, size, ltype=ltype)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                found = leaselock.probe(fd, offset, size, ltype=ltype)
            finally:
                os.close(fd)
    except OSError:
        return []
    if found is None:
        return []
    kind, pid = found
    from . import lease

    info = lease.inspect(path)
    if pid > 0:
        who = f"pid {pid}"
    elif info is not None:
        who = info.describe()  # OFD locks carry no pid: the lease file names the holder
    else:
        who = "another open file (OFD lock)"
    what = "write" if kind == fcntl.F_WRLCK else "read"
    return [Activity("lock", f"{what} lock on the overlay held by {who}", kind == fcntl.F_WRLCK)]


def lease_holder(path: str, *, job: str | None = None) -> list[Activity]:
    from . import lease

    info = lease.inspect(path)
    if info is None or not info.is_alive() or (job is not None and info.job_id == str(job)):
        return []
    return [Activity("lease", info.describe(), True)]


def _own_lock_fd(path: str, job: str | None, own_lease: Lease | None) -> int | None:
    if own_lease is not None and own_lease.lock_fd is not None and not own_lease.released:
        return own_lease.lock_fd
    if job is None:
        return None
    from . import lease

    return lease.held_lock_fd(path, job)


def find_activity(
    path: str, offset: int, size: int, *, locks: bool = True, writers_only: bool = True, job: str | None = None,
    own_lease: Lease | None = None,
) -> list[Activity]:
    """Every sign of use of [offset, offset+size) of `path` on this host. `job` (or
    `own_lease`, whose job it is): the caller runs inside that job's lease, so neither
    its lease file nor the byte-range lock this process holds for it counts."""
    if own_lease is not None and job is None:
        job = own_lease.info.job_id
    st = os.stat(path)
    daemons = fuse_processes(st)
    mounts = fuse_mounts(st)
    if any(a.kind == "fuse" for a in daemons):
        # The daemons' own open modes are exact (a fuse2fs ro mount still shows "rw" in
        # mountinfo); mount entries matter only when no daemon is visible to us (another
        # pid namespace), and then count as writers.
        mounts = [a for a in mounts if a.kind != "fuse"]
    found = mounts + daemons + loop_devices(st, offset, size)
    if locks:
        own_fd = _own_lock_fd(path, job, own_lease)
        found += byte_range_lock(path, offset, size, writers_only=writers_only, own_fd=own_fd)
    found += lease_holder(path, job=job)
    return found


def ensure_quiet(
    path: str, offset: int, size: int, *, locks: bool = True, writers_only: bool = True, job: str | None = None,
    own_lease: Lease | None = None,
) -> list[Activity]:
    """Raise ImageBusy when a writer (or, with writers_only=False, any user) is active;
    return the harmless activity seen (read-only mounts)."""
    found = find_activity(path, offset, size, locks=locks, writers_only=writers_only, job=job, own_lease=own_lease)
    blocking = [a for a in found if a.writer or (not writers_only and a.kind != "fuse-layer")]
    if blocking:
        first = blocking[0]
        raise ImageBusy(
            path,
            f"overlay in use: {'; '.join(a.detail for a in blocking)}",
            holder={"kind": first.kind, "detail": first.detail},
        )
    return found
