"""What this host's /proc says: is a process still the one we recorded, which boot is
this, and what is mounted. Read-only; shared by the lease (stale holders), quiesce
(FUSE mounts over an image) and the runtime (its FUSE daemons and mount points).

A process is identified by (pid, start time in clock ticks since boot): a pid alone may
have been recycled. Across a reboot start times repeat, hence boot_id.
"""

# No `from __future__ import annotations` here: NamedTuple would compile each field's string
# annotation at import, which `overlay status` pays on every start (issue 17, fast CLI).
import os
from typing import NamedTuple

__all__ = ["MountEntry", "boot_id", "mountinfo", "pid_exists", "process_alive", "process_start_ticks",
           "unescape_mount_field"]


def boot_id() -> str | None:
    """This boot's random id (changes on every reboot), None where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on; None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    return stat[stat.rfind(b")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def pid_exists(pid: int) -> bool:
    """A process with `pid` exists on this host (EPERM: yes, another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def process_alive(pid: int | None, started: int | None) -> bool:
    """`pid` still runs and is the process that started at `started` (None: any start).
    A zombie has exited (only its parent's wait is missing); a process whose /proc entry
    we cannot read (hidepid) but which exists counts as alive."""
    if not pid or not pid_exists(pid):
        return False
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= 19:
        return True
    if fields[0] == b"Z":
        return False
    return started is None or int(fields[19]) == started


# --- mountinfo ---------------------------------------------------------------------------------------
class MountEntry(NamedTuple):  # not a dataclass: quiesce, hence `overlay status`, must import fast
    """One line of /proc/<pid>/mountinfo, fields unescaped."""

    mount_id: int
    target: str
    fstype: str
    source: str
    options: str  # per-mount options (ro/rw, nosuid, ...)
    device: str = ""  # "major:minor" of the mounted filesystem
    super_options: str = ""  # per-superblock options (FUSE: user_id=, group_id=, ...)


def unescape_mount_field(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """The mounts of our mount namespace, in mount order. OSError when unreadable."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(), right.split()
            if sep and len(fields) >= 6 and len(tail) >= 2:
                entries.append(MountEntry(int(fields[0]), unescape_mount_field(fields[4]), tail[0],
                                          unescape_mount_field(tail[1]), fields[5], fields[2],
                                          tail[2] if len(tail) > 2 else ""))
    return entries
