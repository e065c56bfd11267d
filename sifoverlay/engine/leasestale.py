"""When a lease may be broken, and breaking it without a race.

Stale rule (a lease may be broken only when ALL of this holds, or at once when it was
written on this host during an earlier boot: a reboot ended every process of its holder):
  1. it is expired: ``now > heartbeat + ttl``; and
  2. on the same host (same host name) and the same boot (boot_id): the holder process
     is gone — its pid does not exist, or exists with another start time (pid reuse);
     same host name but another boot_id: the node rebooted, the holder is gone; on
     another host: it is expired by more than ``grace`` seconds (the larger of the
     caller's grace and the grace the record itself announces, so a breaker configured
     with a shorter grace never cuts into the holder's keeper's margin), because we
     cannot see that host's processes (it may only be partitioned or frozen). A pid is
     never judged alone: on a cluster whose nodes share a pid space (containers, the
     multi-node test bed) a pid of another host says nothing.
  An unreadable/torn lease file is judged by its mtime as if it were the heartbeat.

Breaking renames the file to a unique tomb name (only one breaker can win that rename),
checks that the tomb is the very inode that was judged (a heartbeat in between replaces
the inode) and puts it back otherwise.
"""

from __future__ import annotations

import logging
import os
import time

from sifoverlay.fsio import REAL_IO, FileIO

from . import procs
from .leasefile import DEFAULT_GRACE, DEFAULT_TTL, LeaseInfo, parse_temp_name, read_info, temp_name, unlink_quietly

log = logging.getLogger(__name__)


def holder_alive(info: LeaseInfo, *, grace: float = DEFAULT_GRACE, now: float | None = None) -> bool:
    """False when `info` is stale by the rule of the module docstring."""
    now = time.time() if now is None else now
    here = info.host == os.uname().nodename
    if here and info.boot_id is not None and info.boot_id != procs.boot_id():
        return False  # this host rebooted since: nothing of that holder runs any more, expiry or not
    if now <= info.expires:
        return True
    if not here:
        return now <= info.expires + max(grace, record_grace(info))
    return procs.process_alive(info.pid, info.started)


def record_grace(info: LeaseInfo) -> float:
    """The grace the holder announced in its record (its keeper fences by it), 0 if none."""
    try:
        return max(0.0, float(info.record.get("grace", 0.0)))
    except (TypeError, ValueError):
        return 0.0


def breakable_at(info: LeaseInfo, *, grace: float = DEFAULT_GRACE) -> float:
    """Wall-clock time from which another host may break the lease (expiry + grace)."""
    return info.expires + max(grace, record_grace(info))


def break_file(path: str, inode: int, *, io: FileIO = REAL_IO) -> bool:
    """Remove the lease file at `path` if it is still inode `inode`. True when removed."""
    tomb = temp_name(path, "tomb")
    try:
        io.rename(path, tomb)
    except FileNotFoundError:
        return False
    judged = os.stat(tomb).st_ino == inode
    if not judged:  # a heartbeat or a new holder got in between: put theirs back
        try:
            io.link(tomb, path)
        except FileExistsError:
            log.error("%s: could not restore a lease moved aside while breaking", path)
    unlink_quietly(tomb, io=io)
    io.fsync_dir(os.path.dirname(path))
    return judged


def remove_if_ours(path: str, token: str, *, io: FileIO = REAL_IO) -> bool:
    """Remove the record at `path` only if it carries our token (release)."""
    info = read_info(path)
    if info is None or info.token != token:
        return False
    return break_file(path, info.inode, io=io)


def sweep_temp_files(target: str, *, io: FileIO = REAL_IO) -> list[str]:
    """Remove temp/tomb files of the lease file `target` that a killed acquirer, heartbeat
    or breaker left behind: on this host when their process is gone, from other hosts
    when older than ttl+grace."""
    directory = os.path.dirname(target)
    removed = []
    now, me = time.time(), os.uname().nodename
    for name in os.listdir(directory):
        parsed = parse_temp_name(target, name)
        if parsed is None:
            continue
        _, host, pid = parsed
        path = os.path.join(directory, name)
        try:
            age = now - os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        if (host == me and not procs.process_alive(pid, None)) or (host != me and age > DEFAULT_TTL + DEFAULT_GRACE):
            unlink_quietly(path, io=io)
            removed.append(name)
    return removed
