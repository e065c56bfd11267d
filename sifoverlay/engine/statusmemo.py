"""`overlay status` from the CLI without loading the engine's parsers (issue 17, fast CLI).

A status reads the SIF header, descriptors, index, manifest and the ext3 superblock; what
a short-lived CLI process pays is importing the parsers (tens of ms), not parsing. So
after a full `status` (engine/status.py, remember=True) that hashed nothing, saw no writer
and no pending journal entry, and logged no warning, the CLI leaves a *memo* of its
result (Status.as_dict()) in its own state directory. The next CLI status answers from
the memo when everything the full path would look at says the same:

* the image, opened as status opens it (statedir.open_image_checked), has the
  (st_dev, st_ino, size, mtime, ctime) of the memo: no byte was written since the full
  path parsed it (see noopmemo: ctime moves on every write, and the memo's stamp was
  taken before the parse, QUIET_NS after the last write, and was unchanged after it);
  so the overlay region, recorded digest and fingerprint and the capacity are the same;
* the 1024 superblock bytes are those the full path saw (fingerprint, free bytes, the
  dirty flag);
* no journal entry of the image by name (any name counts): journal_pending is 0;
* no writer: quiesce's FUSE daemon, FUSE mount and loop device checks (the very
  functions find_activity runs) find none, no write lock covers the overlay region (the
  probe find_activity makes), and no writer lease record of the image exists in any state
  directory whose records count (any record, live or not, or any error reading the name:
  the full path decides, and warns where it would);
* no hashing asked for: never with verify=True; with verify=None only when the memo
  recorded a fingerprint (without one the full path hashes).

Anything else, a missing or malformed memo, or an error of any kind: no answer, and the
full path runs and reports. Standard library plus statedir, noopmemo and quiesce's light
half: nothing of the parsers. The result is kept with marshal, which needs no import (json
costs a short-lived process ~2 ms): the memo is read only when it is a regular file of
our own uid (as root in a root-owned directory), so no one else can have written it.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import struct
import time
from typing import Any

from sifoverlay.errors import SifOverlayError

from . import noopmemo, statedir

VERSION = "sifoverlay-status-memo-2"
MEMO_DIR = "status-memo"
QUIET_NS = noopmemo.QUIET_NS  # the same rule as the no-op sync's memo (a separate name: tests set it)
LEASE_SUFFIX = ".lease"  # = leasefile.LEASE_SUFFIX (not imported: it loads the lease record code)
_FLOCK = "hhqqi4x"  # = leaselock._FLOCK, struct flock on LP64 Linux
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_MAX_MEMO = 65536
MARSHAL_VERSION = 4  # the format of Python >= 3.4; a memo written by another Python still loads


def _memo_path(st: os.stat_result) -> str:
    return os.path.join(statedir.default_dir(), MEMO_DIR, f"{st.st_dev:x}-{st.st_ino}")


def quiet_stamp(fd: int) -> os.stat_result | None:
    """fstat of the image before a full status parses it, when its last write is QUIET_NS
    old (a later write then surely moves the ctime); None: no memo this time."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st if time.time_ns() - st.st_ctime_ns >= QUIET_NS else None


def remember(fd: int, before: os.stat_result, data: dict[str, Any]) -> bool:
    """Write the memo of the full status `data` (Status.as_dict()) of the image behind
    `fd`, whose `quiet_stamp` was `before`. True when written; never raises."""
    try:
        if os.fstat(fd).st_ctime_ns != before.st_ctime_ns:
            return False  # written while parsed
        offset = int(data["overlay_offset"])
        superblock = os.pread(fd, noopmemo.SUPERBLOCK_SIZE, offset + noopmemo.SUPERBLOCK_OFFSET)
        if len(superblock) != noopmemo.SUPERBLOCK_SIZE or noopmemo.stamp(os.fstat(fd)) != noopmemo.stamp(before):
            return False
        head = " ".join([VERSION, *noopmemo.stamp(before), str(offset), superblock.hex()])
        body = marshal.dumps({**data, "image": ""}, MARSHAL_VERSION)
        from sifoverlay.fsio import REAL_IO

        path = _memo_path(before)
        statedir.ensure(os.path.dirname(path))
        REAL_IO.write_file_atomic(path, f"{head}\n".encode("ascii") + body, mode=0o600, durable=False)
        return True
    except (OSError, ValueError, KeyError, TypeError, UnicodeError, SifOverlayError):  # marshal: ValueError
        return False  # e.g. NotAuthorized: a state dir not root's alone; a memo is only an optimisation


def _read_memo(st: os.stat_result) -> tuple[list[str], dict[str, Any]] | None:
    data = noopmemo.read_own_memo(_memo_path(st), _MAX_MEMO)
    if data is None:
        return None
    head, _, body = data.partition(b"\n")
    fields = head.decode("ascii").split()
    if len(fields) != 8 or fields[0] != VERSION:
        return None
    result = marshal.loads(body)
    return (fields, result) if isinstance(result, dict) else None


def _lease_record_may_exist(key: str) -> bool:
    """A writer lease file of the image in a state directory whose records count
    (leasefile.lease_paths), or a name that cannot be looked at."""
    for directory in statedir.read_dirs():
        try:
            os.lstat(os.path.join(directory, statedir.LEASES, key + LEASE_SUFFIX))
        except FileNotFoundError:
            continue
        except OSError:
            return True
        return True
    return False


def _write_locked(fd: int, offset: int, size: int) -> bool:
    """quiesce.byte_range_lock(writers_only=True): a write lock on the region, probed through
    a new description of the image (OSError here: the caller gives no answer)."""
    probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        raw = fcntl.fcntl(probe, F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, offset, size, 0))
    finally:
        os.close(probe)
    kind: int = struct.unpack(_FLOCK, raw)[0]
    return kind != fcntl.F_UNLCK


def _writer_seen(fd: int, st: os.stat_result, offset: int, size: int) -> bool:
    """What quiesce.find_activity(fd=) would count as a writer, or more."""
    from . import quiesce

    if _write_locked(fd, offset, size):
        return True
    found = quiesce.loop_devices(st, offset, size) + quiesce.fuse_mounts(st) + quiesce.fuse_processes(st)
    return any(a.writer for a in found)


def cached_status(image: str, *, verify: bool | None, journal_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """engine.status(image, verify=, journal_dir=).as_dict() from the memo when the full
    path would answer exactly that right now (module docstring), else None."""
    if verify is True:
        return None
    try:
        fd = statedir.open_image_checked(image)
    except (OSError, SifOverlayError):  # the full path opens it again and reports what is wrong
        return None
    try:
        st = os.fstat(fd)
        memo = _read_memo(st)
        if memo is None:
            return None
        fields, data = memo
        if fields[1:6] != noopmemo.stamp(st) or data.get("actual_digest") is not None:
            return None
        if verify is None and data.get("fingerprint_recorded") is None:
            return None  # the full path would hash
        if data.get("holder") is not None or data.get("journal_pending") != 0:
            return None
        offset, size = int(fields[6]), int(data["overlay_size"])
        if offset != data.get("overlay_offset") or size <= 0:
            return None
        if os.pread(fd, noopmemo.SUPERBLOCK_SIZE, offset + noopmemo.SUPERBLOCK_OFFSET) != bytes.fromhex(fields[7]):
            return None
        key = statedir.identity_key(fd)
        if noopmemo.journal_has_entries(noopmemo.journal_directory(journal_dir), key):
            return None
        if _lease_record_may_exist(key) or _writer_seen(fd, st, offset, size):
            return None
        if os.fstat(fd).st_ctime_ns != st.st_ctime_ns:
            return None
        data["image"] = image
        return data
    except (OSError, ValueError, KeyError, TypeError, EOFError, UnicodeError, SifOverlayError):  # a malformed memo...
        return None  # the full path decides
    finally:
        os.close(fd)
