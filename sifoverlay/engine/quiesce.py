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

Nothing a user can forge counts (docs/security.md, finding 6). Anyone may mount FUSE with
``fsname=<somebody's image>`` or name a process "fuse2fs", so a FUSE mount or daemon is
activity only when it belongs to a trusted uid - root, the image's owner, or the job user
(`owners=`) - judged from what the kernel records: the mount's ``user_id=`` super option,
the daemon's real and effective uid in /proc/<pid>/status. A daemon serves this image only
when one of its descriptors is this inode, read from /proc/<pid>/fdinfo (mnt_id + ino) -
never by stat()ing its fd links or its mount point, which would ask the FUSE daemon and
could block root forever. The few stat()s left (a trusted mount's source and mount point)
run with a deadline; one that does not answer counts as live.
"""

import errno
import fcntl
import os
from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

from sifoverlay.errors import ImageBusy

from . import procs

if TYPE_CHECKING:
    from .lease import Lease

# Light at import (no logging, dataclasses, threading or lease modules; no `from __future__
# import annotations`, whose string annotations NamedTuple compiles one by one): the
# `overlay status` fast path (engine/statusmemo.py) runs the FUSE and loop checks below.
# fuse2fs mounts show up as fuse.<fs type from the superblock>, e.g. fuse.ext4.
FUSE_WRITERS = ("fuse2fs", "ext2", "ext3", "ext4")
FUSE_READERS = ("squashfuse", "squashfuse_ll")


class Activity(NamedTuple):
    """One sign of use. `writer` = it may change the ext3 bytes."""

    kind: str  # "fuse" (ext3) | "fuse-layer" (squashfs layer) | "loop" | "lock" | "lease"
    detail: str
    writer: bool


STAT_DEADLINE = 2.0  # seconds a stat() of a trusted FUSE mount may take before it counts as live


def _bounded_stat(path: str, deadline: float = STAT_DEADLINE) -> os.stat_result | OSError | None:
    """os.stat(path) in a helper thread: the result, the OSError, or None when it did not
    answer in time (a stopped FUSE daemon). The thread is a daemon: it cannot keep us."""
    import threading

    box: list[os.stat_result | OSError] = []

    def run() -> None:
        try:
            box.append(os.stat(path))
        except OSError as exc:
            box.append(exc)

    worker = threading.Thread(target=run, name="quiesce-stat", daemon=True)
    worker.start()
    worker.join(deadline)
    return box[0] if box else None


def _same_file(candidate: str, st: os.stat_result) -> bool | None:
    """Is `candidate` the inode `st`? None = could not tell in time."""
    other = _bounded_stat(candidate)
    if other is None:
        return None
    if isinstance(other, OSError):
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def trusted_uids(st: os.stat_result, owners: Collection[int] | None = None) -> frozenset[int]:
    """root, the image's owner and the given job user(s)."""
    return frozenset({0, st.st_uid, *(owners or ())})


def _option(options: str, key: str) -> str | None:
    for item in options.split(","):
        name, _, value = item.partition("=")
        if name == key:
            return value
    return None


def _names_a_descriptor(source: str) -> bool:
    """A mount source like /proc/self/fd/7 (how the runtime hands the image to fuse2fs):
    it names a descriptor of the mounter, not a file anyone else can look up."""
    parts = source.split("/")
    return len(parts) == 5 and parts[:2] == ["", "proc"] and parts[3] == "fd"


def _visible_daemon_targets(proc: str, trusted: frozenset[int]) -> set[str]:
    """The mount points named on the command lines of the FUSE daemons of trusted uids
    this process can see."""
    targets: set[str] = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return targets
    for pid in pids:
        if _read(os.path.join(proc, pid, "comm")) not in ("fuse2fs", "squashfuse", "squashfuse_ll"):
            continue
        uids = _uids(proc, pid)
        if not uids or not uids <= trusted:
            continue
        argv = _read(os.path.join(proc, pid, "cmdline")).split("\0")
        targets.update(a for a in argv if a.startswith("/"))
    return targets


def fuse_mounts(st: os.stat_result, mountinfo: str = "/proc/self/mountinfo", *,
                owners: Collection[int] | None = None, proc: str = "/proc") -> list[Activity]:
    """FUSE mounts of the image made by a trusted uid (the mount's user_id=). A mount whose
    source names the mounter's descriptor (/proc/self/fd/N) is judged by its daemon when
    that daemon is visible (fuse_processes reads which inode it has open): stat()ing that
    name here would look at OUR descriptor N, which made the mounts of other images count
    as this one's. When its daemon is not visible (another pid namespace) it counts."""
    found: list[Activity] = []
    trusted = trusted_uids(st, owners)
    try:
        entries = procs.mountinfo(mountinfo)
    except OSError:
        return found
    daemon_targets: set[str] | None = None
    for entry in entries:
        fstype = entry.fstype
        program = fstype.split(".", 1)[1] if fstype.startswith("fuse.") else fstype
        if program not in FUSE_WRITERS + FUSE_READERS and fstype != "fuse":
            continue
        owner = _option(entry.super_options, "user_id")
        if owner is None or not owner.isdigit() or int(owner) not in trusted:
            continue  # anyone can mount FUSE with fsname=<this image>: not evidence
        if _names_a_descriptor(entry.source):
            if daemon_targets is None:
                daemon_targets = _visible_daemon_targets(proc, trusted)
            if entry.target in daemon_targets:
                continue  # its daemon is visible: fuse_processes says whether it serves this image
            same = None
        else:
            same = _same_file(entry.source, st)
        if same is False:
            continue
        if same is not None and _dead_mount(entry.target):
            continue  # its daemon is gone: nothing can write through it
        kind = "fuse-layer" if program in FUSE_READERS else "fuse"
        writable = kind == "fuse" and "ro" not in entry.options.split(",")
        found.append(Activity(kind, f"{program} mount at {entry.target} ({'rw' if writable else 'ro'})", writable))
    return found


def _dead_mount(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died answers ENOTCONN (one that does not answer lives)."""
    result = _bounded_stat(mountpoint)
    return isinstance(result, OSError) and result.errno == errno.ENOTCONN


def _uids(proc: str, pid: str) -> set[int]:
    """Real, effective, saved and filesystem uid of a process (empty when unreadable)."""
    for line in _read(os.path.join(proc, pid, "status")).splitlines():
        if line.startswith("Uid:"):
            return {int(v) for v in line.split()[1:] if v.isdigit()}
    return set()


def _mount_devices(proc: str, pid: str) -> dict[int, str]:
    """mount id -> "major:minor", from the process's own mountinfo."""
    try:
        return {e.mount_id: e.device for e in procs.mountinfo(os.path.join(proc, pid, "mountinfo"))}
    except OSError:
        return {}


def _fdinfo(proc: str, pid: str, fd: str) -> dict[str, str]:
    info: dict[str, str] = {}
    for line in _read(os.path.join(proc, pid, "fdinfo", fd)).splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def fuse_processes(st: os.stat_result, proc: str = "/proc", *, owners: Collection[int] | None = None) -> list[Activity]:
    """FUSE daemons (fuse2fs, squashfuse) of a trusted uid holding this inode open: also
    catches mounts whose source was given as /proc/self/fd/N, which mountinfo cannot
    resolve. The inode is matched from fdinfo (mnt_id -> device, ino): no fd link is
    followed, no FUSE daemon is asked anything."""
    found: list[Activity] = []
    trusted = trusted_uids(st, owners)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        comm = _read(os.path.join(proc, pid, "comm"))
        if comm not in ("fuse2fs", "squashfuse", "squashfuse_ll"):
            continue
        uids = _uids(proc, pid)
        if not uids or not uids <= trusted:
            continue  # a process anyone can name "fuse2fs": only trusted uids count
        try:
            fds = os.listdir(os.path.join(proc, pid, "fd"))
        except OSError:
            continue
        devices: dict[int, str] | None = None
        for fd in fds:
            info = _fdinfo(proc, pid, fd)
            if info.get("ino") != str(st.st_ino) or not info.get("mnt_id", "").isdigit():
                continue
            if devices is None:
                devices = _mount_devices(proc, pid)
            if devices.get(int(info["mnt_id"])) != device:
                # btrfs and the like report another device in mountinfo than in stat():
                # ask stat, with a deadline (this daemon is trusted, but may be stopped)
                if _same_file(os.path.join(proc, pid, "fd", fd), st) is False:
                    continue
            flags = int(info.get("flags", "0"), 8)
            writable = comm == "fuse2fs" and flags & os.O_ACCMODE != os.O_RDONLY
            kind = "fuse" if comm == "fuse2fs" else "fuse-layer"
            found.append(Activity(kind, f"{comm} pid {pid} has the image open ({'rw' if writable else 'ro'})", writable))
            break
    return found


def _read(path: str) -> str:
    """A small /proc or /sys file, stripped ("" when unreadable). os.read, not open(): this
    runs for every pid on the host, and a text file object costs three times as much."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return ""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace").strip()


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
        if backing.endswith(" (deleted)") or _same_file(backing, st) is False:
            continue
        lo_offset = int(_read(os.path.join(base, "loop", "offset")) or 0)
        limit = int(_read(os.path.join(base, "loop", "sizelimit")) or 0)
        lo_end = lo_offset + limit if limit else st.st_size
        if lo_end <= offset or lo_offset >= offset + size:
            continue
        writable = _read(os.path.join(base, "ro")) != "1"
        found.append(Activity("loop", f"/dev/{name} at offset {lo_offset} ({'rw' if writable else 'ro'})", writable))
    return found


def byte_range_lock(path: str, offset: int, size: int, *, writers_only: bool, own_fd: int | None = None,
                    image_fd: int | None = None) -> list[Activity]:
    """A conflicting lock on [offset, offset+size) held through another open file.
    Probing through `own_fd` (the description holding our own lease's lock) leaves that
    lock out: a description never conflicts with itself. `image_fd`: probe through a new
    description of that inode (reopened through the fd, never by name)."""
    from . import leaselock

    ltype = fcntl.F_RDLCK if writers_only else fcntl.F_WRLCK
    try:
        if own_fd is not None:
            found = leaselock.probe(own_fd, offset, size, ltype=ltype)
        else:
            if image_fd is not None:
                fd = os.open(f"/proc/self/fd/{image_fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
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

    info = lease.inspect(path, image_fd=image_fd) if image_fd is not None else lease.inspect(path)
    if pid > 0:
        who = f"pid {pid}"
    elif info is not None:
        who = info.describe()  # OFD locks carry no pid: the lease file names the holder
    else:
        who = "another open file (OFD lock)"
    what = "write" if kind == fcntl.F_WRLCK else "read"
    return [Activity("lock", f"{what} lock on the overlay held by {who}", kind == fcntl.F_WRLCK)]


def lease_holder(path: str, *, job: str | None = None, image_fd: int | None = None) -> list[Activity]:
    from . import lease

    info = lease.inspect(path, image_fd=image_fd) if image_fd is not None else lease.inspect(path)
    if info is None or not info.is_alive() or (job is not None and info.job_id == str(job)):
        return []
    return [Activity("lease", info.describe(), True)]


def _own_lock_fd(path: str, job: str | None, own_lease: "Lease | None", image_fd: int | None = None) -> int | None:
    if own_lease is not None and own_lease.lock_fd is not None and not own_lease.released:
        return own_lease.lock_fd
    if job is None:
        return None
    from . import lease

    if image_fd is not None:
        return lease.held_lock_fd(path, job, image_fd=image_fd)
    return lease.held_lock_fd(path, job)


def find_activity(
    path: str, offset: int, size: int, *, locks: bool = True, writers_only: bool = True, job: str | None = None,
    own_lease: "Lease | None" = None, fd: int | None = None, owners: Collection[int] | None = None,
) -> list[Activity]:
    """Every sign of use of [offset, offset+size) of `path` on this host. `job` (or
    `own_lease`, whose job it is): the caller runs inside that job's lease, so neither
    its lease file nor the byte-range lock this process holds for it counts. `fd`: the
    caller's authorized descriptor (then `path` is only a name for messages). `owners`:
    the job user's uid(s), trusted besides root and the image's owner."""
    if own_lease is not None and job is None:
        job = own_lease.info.job_id
    st = os.fstat(fd) if fd is not None else os.stat(path)
    daemons = fuse_processes(st, owners=owners)
    mounts = fuse_mounts(st, owners=owners)
    if any(a.kind == "fuse" for a in daemons):
        # The daemons' own open modes are exact (a fuse2fs ro mount still shows "rw" in
        # mountinfo); mount entries matter only when no daemon is visible to us (another
        # pid namespace), and then count as writers.
        mounts = [a for a in mounts if a.kind != "fuse"]
    found = mounts + daemons + loop_devices(st, offset, size)
    if locks:
        own_fd = _own_lock_fd(path, job, own_lease, fd)
        found += byte_range_lock(path, offset, size, writers_only=writers_only, own_fd=own_fd, image_fd=fd)
    found += lease_holder(path, job=job, image_fd=fd)
    return found


def ensure_quiet(
    path: str, offset: int, size: int, *, locks: bool = True, writers_only: bool = True, job: str | None = None,
    own_lease: "Lease | None" = None, fd: int | None = None, owners: Collection[int] | None = None,
) -> list[Activity]:
    """Raise ImageBusy when a writer (or, with writers_only=False, any user) is active;
    return the harmless activity seen (read-only mounts)."""
    found = find_activity(path, offset, size, locks=locks, writers_only=writers_only, job=job, own_lease=own_lease,
                          fd=fd, owners=owners)
    blocking = [a for a in found if a.writer or (not writers_only and a.kind != "fuse-layer")]
    if blocking:
        first = blocking[0]
        raise ImageBusy(
            path,
            f"overlay in use: {'; '.join(a.detail for a in blocking)}",
            holder={"kind": first.kind, "detail": first.detail},
        )
    return found
