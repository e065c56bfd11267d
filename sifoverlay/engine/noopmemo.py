"""A no-op `overlay sync` from the CLI without loading the engine (issue 17, fast CLI).

`reconcile.sync` decides "noop" after parsing the SIF header, descriptors, index and
manifest (where the overlay is, which fingerprint and digest were recorded) and reading
the ext3 superblock. Parsing is cheap; importing the parsers is what a short-lived CLI
process pays (tens of ms). So when the full path has decided "noop", the CLI leaves a
*memo* in its own state directory, and the next CLI sync first checks the memo:

* the image, opened as sync opens it (statedir.open_image_checked), still has the
  (st_dev, st_ino, size, mtime, ctime) of the memo: no byte of it was written since the
  full path parsed it (ctime moves on every write and cannot be set by a user), so the
  parse would give the same overlay region and the same recorded fingerprint and digest;
  a memo is only written when the image's ctime is QUIET_NS old, so a write in the same
  clock tick as the parse cannot hide behind an equal ctime;
* the 1024 superblock bytes are those the full path saw (the fingerprint and the dirty
  flag are functions of them): nothing mounted it read-write since;
* the journal directory is the one the full path used and holds no entry of the image
  (by name only, any name counts: more cautious than Journal.pending); the image's
  journal key is the one the full path computed (a reused inode number has a new ctime).

`remember` runs right after the full path's decision and re-reads the superblock itself:
a write between the two gives the image a ctime younger than QUIET_NS, and no memo.

Any difference, a missing or foreign record, or an error of any kind: no answer, and the
full path runs (and reports). The memo never decides more than the full fast path does.
Standard library plus statedir/fsio only: nothing that the no-op path would not load.
"""

from __future__ import annotations

import os
import stat
import time

from sifoverlay.errors import SifOverlayError

from . import statedir

VERSION = "sifoverlay-noop-memo-1"
MEMO_DIR = "noop-memo"
QUIET_NS = 2_000_000_000  # a memo needs an image unwritten for this long (ctime granularity, racy writes)
SUPERBLOCK_OFFSET = 1024  # = ext3.superblock.SUPERBLOCK_OFFSET / _SIZE (not imported: the point of this module)
SUPERBLOCK_SIZE = 1024
JOURNAL_SUFFIX = ".sovj"  # = journal.SUFFIX
ENV_JOURNAL_DIR = "SIFOVERLAY_JOURNAL_DIR"  # = journal.ENV_JOURNAL_DIR
_MAX_MEMO = 8192


def journal_directory(journal_dir: str | os.PathLike[str] | None) -> str:
    """What Journal(journal_dir).directory is (journal.default_journal_dir), without journal."""
    if journal_dir is not None:
        return os.path.abspath(os.fspath(journal_dir))
    env = os.environ.get(ENV_JOURNAL_DIR)
    if env:
        return os.path.abspath(env)
    return os.path.join(statedir.default_dir(), "journal")


def _memo_path(st: os.stat_result) -> str:
    return os.path.join(statedir.default_dir(), MEMO_DIR, f"{st.st_dev:x}-{st.st_ino}")


def stamp(st: os.stat_result) -> list[str]:
    return [str(v) for v in (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)]


def remember(fd: int, *, journal_dir: str, key: str, offset: int, size: int, digest: str) -> bool:
    """Write the memo for the image behind `fd` after the full path decided "noop" for
    overlay [offset, offset+size) with recorded `digest`; `key` = statedir.identity_key(fd).
    True when written; never raises (a memo is an optimisation, the sync is done)."""
    try:
        st = os.fstat(fd)
        if time.time_ns() - st.st_ctime_ns < QUIET_NS:
            return False
        superblock = os.pread(fd, SUPERBLOCK_SIZE, offset + SUPERBLOCK_OFFSET)
        if len(superblock) != SUPERBLOCK_SIZE or os.fstat(fd).st_ctime_ns != st.st_ctime_ns:
            return False
        fields = [VERSION, *stamp(st), key, str(offset), str(size), digest,
                  os.fsencode(journal_dir).hex(), superblock.hex()]
        if any(not f or any(c.isspace() for c in f) for f in fields):
            return False
        from sifoverlay.fsio import REAL_IO

        path = _memo_path(st)
        statedir.ensure(os.path.dirname(path))
        REAL_IO.write_file_atomic(path, (" ".join(fields) + "\n").encode("ascii"), mode=0o600, durable=False)
        return True
    except (OSError, ValueError, UnicodeError, SifOverlayError):  # e.g. NotAuthorized: a state dir not root's alone
        return False


def read_own_memo(path: str, limit: int) -> bytes | None:
    """The bytes of a memo file: a regular file of our own uid (as root: in a root-owned
    directory, else NotAuthorized), never followed through a link, never blocking; None
    when it is anything else. Raises OSError when it is missing."""
    if os.geteuid() == 0:
        statedir.check_root_owned(os.path.dirname(path))  # NotAuthorized: no answer
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mst = os.fstat(fd)
        if not stat.S_ISREG(mst.st_mode) or mst.st_uid != os.geteuid():
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _read_memo(st: os.stat_result) -> list[str] | None:
    data = read_own_memo(_memo_path(st), _MAX_MEMO)
    if data is None:
        return None
    fields = data.decode("ascii").split()
    return fields if len(fields) == 12 and fields[0] == VERSION else None


def journal_has_entries(directory: str, key: str) -> bool:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    prefix = f"{key}."
    return any(n.startswith(prefix) and n.endswith(JOURNAL_SUFFIX) for n in names)


def recorded_noop(image: str, journal_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The recorded overlay digest when a memo shows that `sync(image)` would be a no-op
    right now (see the module docstring), else None (then run the full sync)."""
    try:
        fd = statedir.open_image_checked(image)
    except (OSError, SifOverlayError):  # the full path opens it again and reports what is wrong
        return None
    try:
        st = os.fstat(fd)
        fields = _read_memo(st)
        if fields is None or fields[1:6] != stamp(st):
            return None
        key, offset, size, digest, journal_hex, superblock_hex = fields[6:]
        if bytes.fromhex(journal_hex) != os.fsencode(journal_directory(journal_dir)):
            return None
        if journal_has_entries(journal_directory(journal_dir), key):
            return None
        if os.pread(fd, SUPERBLOCK_SIZE, int(offset) + SUPERBLOCK_OFFSET) != bytes.fromhex(superblock_hex):
            return None
        if int(size) <= 0 or os.fstat(fd).st_ctime_ns != st.st_ctime_ns:
            return None
        return digest
    except (OSError, ValueError, UnicodeError, SifOverlayError):  # a malformed memo, NotAuthorized...
        return None  # the full path decides
    finally:
        os.close(fd)


def noop_result(image: str, digest: str, seconds: float) -> dict[str, object]:
    """SyncResult("noop", ...).as_dict() for the memo's answer (same keys, same order)."""
    return {
        "action": "noop", "image": image, "old_digest": digest, "new_digest": digest, "bytes_hashed": 0,
        "seconds": round(seconds, 6), "replayed": False, "fingerprint_refreshed": False,
    }
