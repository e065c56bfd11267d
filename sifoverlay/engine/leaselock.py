"""The byte-range half of a lease: an OFD lock over the ext3 region of the image.

SingularityCE native mode takes a POSIX ``F_SETLK`` lock on the same range; OFD and POSIX
record locks conflict with each other, so the two tools exclude each other on one node.
OFD locks belong to an open file description, not a process: they survive fork/exec in
whoever inherits the fd and never conflict with the description that holds them, which
is how quiesce tells our own lease's lock from anybody else's (`probe`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Iterator
from typing import Any, Final

from sifoverlay.errors import ImageBusy
from sifoverlay.fsio import REAL_IO, FileIO

from .leasefile import Region, read_info, reader_infos

_FLOCK = "hhqqi4x"  # struct flock on LP64 Linux: l_type, l_whence, l_start, l_len, l_pid
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


# The SIF global header: every commit rewrites it (with the descriptor table) at its commit
# point. Its bytes carry the metadata lock below; no lease ever locks them (a lease locks
# the ext3 region, or the whole file of an image without one, which no commit runs on).
METADATA_RANGE: Final = (0, 128)
METADATA_WAIT: Final = 30.0  # seconds a commit waits for readers still parsing (then goes on)
_POLL: Final = 0.02


@contextlib.contextmanager
def metadata_lock(fd: int, *, exclusive: bool, timeout: float = METADATA_WAIT) -> Iterator[bool]:
    """Keep a reader's parse of the header, descriptor table and metadata blobs apart from
    a commit's rewrite of them and the garbage collection right after it. Only needed where
    the two can overlap: a `:ro` job admitted while the previous writer's job end hashes
    and commits (lease.py, phase "reconciling"). A reader holds a read lock on
    METADATA_RANGE through `fd` while it parses; a commit holds the write lock (`fd` opened
    for writing) from its commit point through its GC. Polls, never blocks: anyone who can
    read the image can lock it, so past `timeout` the caller goes on without (yields
    False). The lock spares a reader a torn view; the image's safety never depends on it."""
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    deadline = time.monotonic() + timeout
    held = False
    while True:
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, flock_struct(ltype, *METADATA_RANGE))
            held = True
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                break  # e.g. EBADF, a descriptor not open for writing: go on without
        if not _metadata_locked(fd, ltype):
            # Not the metadata lock itself that is in the way but a lease's lock over the
            # whole file (an image without overlay: our own lease's, when this is the commit
            # of an overlay create): no parse to wait for; the lease decides who goes on.
            break
        if time.monotonic() >= deadline:
            logging.getLogger(__name__).warning(
                "metadata %s lock not granted within %.0fs: going on without it", "write" if exclusive else "read",
                timeout)
            break
        time.sleep(_POLL)
    try:
        yield held
    finally:
        if held:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_OFD_SETLK, flock_struct(fcntl.F_UNLCK, *METADATA_RANGE))


def _metadata_locked(fd: int, ltype: int) -> bool:
    """A lock on exactly METADATA_RANGE (a reader parsing, a commit committing) conflicts
    with an `ltype` lock there."""
    raw = fcntl.fcntl(fd, F_OFD_GETLK, flock_struct(ltype, *METADATA_RANGE))
    kind, _, start, length, _ = struct.unpack(_FLOCK, raw)
    return kind != fcntl.F_UNLCK and (start, length) == METADATA_RANGE


def flock_struct(ltype: int, offset: int, size: int) -> bytes:
    return struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, size, 0)


def probe(fd: int, offset: int, size: int, *, ltype: int) -> tuple[int, int] | None:
    """(lock type, pid) of a lock that would block an `ltype` lock on [offset,
    offset+size) through `fd`, else None. pid is -1 for OFD locks (they have no owner
    process), > 0 for POSIX locks. Locks of `fd`'s own description never show up."""
    raw = fcntl.fcntl(fd, F_OFD_GETLK, flock_struct(ltype, offset, size))
    kind, _, _, _, pid = struct.unpack(_FLOCK, raw)
    return None if kind == fcntl.F_UNLCK else (kind, pid)


def open_for_lock(image: str, image_fd: int | None, *, exclusive: bool, io: FileIO = REAL_IO) -> int:
    """A new open file description of the image to hold the lock. A write lock needs one
    opened for writing (else EBADF); nothing is written through it. `image_fd` is
    reopened through /proc/self/fd so the lock lands on that very inode."""
    from . import statedir

    if image_fd is not None:
        return statedir.reopen(image_fd, writable=exclusive, io=io)
    fd = statedir.open_image_checked(image, writable=exclusive, io=io)
    os.set_blocking(fd, True)
    return fd


def overlay_region(image: str, fd: int) -> Region:
    """(offset, size) of the ext3 overlay, read through `fd`; whole file without one."""
    from sifoverlay.ocisif import open_image  # image model layer: imported only when needed
    from sifoverlay.sif.load import SifFile

    sif = SifFile.from_fd(os.dup(fd), image)
    try:
        overlay = open_image(sif).overlay
    finally:
        sif.close()
    return (0, 0) if overlay is None else (overlay.offset, overlay.size)


def lock_region(image: str, fd: int, region: Region, *, exclusive: bool, targets: list[str] | None = None) -> bool:
    """Take the OFD lock now or raise ImageBusy naming whoever holds a conflicting one.

    Readers cannot block the image owner's writer beyond their own job (docs/security.md):
    when only READ locks conflict with our write lock and no live reader record exists in
    the state directories `targets` are in, and no such lock belongs to a process of root
    or of the image's owner, the writer goes ahead without the byte-range lock (returns
    False; True when the lock is held). Anyone who can read a file can take a read lock
    on it; only root's records (ro jobs) and the owner's own readers are honoured."""
    offset, size = region
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, flock_struct(ltype, offset, size))
        return True
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        if exclusive and targets is not None and _only_foreign_readers(fd, region, targets):
            import logging

            logging.getLogger(__name__).warning(
                "%s: read lock(s) of other users without a reader lease: ignored, writer proceeds", image)
            return False
        who, holder = _lock_holder(image, fd, region, ltype, targets or [])
        raise ImageBusy(image, f"held {who}", holder=holder) from None


def _only_foreign_readers(fd: int, region: Region, targets: list[str]) -> bool:
    found = probe(fd, *region, ltype=fcntl.F_WRLCK)
    if found is None or found[0] != fcntl.F_RDLCK:
        return False  # a write lock (or gone: let the caller retry)
    if any(read_info(t) is not None for t in targets) or any(r.is_alive() for r in reader_infos(targets)):
        return False
    owner = os.fstat(fd).st_uid
    for pid in _read_lock_pids(fd):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if uid in (0, owner):
            return False
    return True


def _read_lock_pids(fd: int) -> list[int]:
    """Pids of POSIX locks on the file behind `fd` (/proc/locks; OFD locks show -1)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:  # no-path-open: ok (procfs)
            for line in fh:
                words = line.split()
                if len(words) >= 6 and words[5] == want and words[4].lstrip("-").isdigit() and int(words[4]) > 0:
                    pids.append(int(words[4]))
    except OSError:
        pass
    return pids


def _lock_holder(image: str, fd: int, region: Region, ltype: int, targets: list[str]) -> tuple[str, dict[str, Any] | None]:
    """Name whoever holds a conflicting byte-range lock: our lease record if there is
    one, else the pid the kernel reports (POSIX locks: e.g. SingularityCE native mode)."""
    for _ in range(20):  # an OFD holder may be between its lock and its link(): let it finish
        for target in targets:
            info = read_info(target)
            if info is not None:
                return f"by {info.describe()}", info.as_dict()
        for reader in reader_infos(targets):
            return f"read-only by {reader.describe()}", reader.as_dict()
        if not targets:
            break
        time.sleep(0.05)
    found = probe(fd, *region, ltype=ltype)
    kind, pid = found if found is not None else (ltype, 0)
    what = "write" if kind == fcntl.F_WRLCK else "read"
    holder = {"host": os.uname().nodename, "pid": pid if pid > 0 else None, "lock": what}
    if pid > 0:
        return f"by pid {pid} on this host ({what} byte-range lock on the overlay, no lease file: e.g. singularity)", holder
    return f"by another open file on this host ({what} OFD lock on the overlay, no lease file)", holder
