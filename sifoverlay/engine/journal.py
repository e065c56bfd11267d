"""The write-ahead journal of image mutations (crash-safety.md R1, R4, R6).

One *entry* file per operation, ``<image key>.<op id>.sovj`` in the journal directory,
holding a sequence of self-validating records::

    magic "SOVJ" | version u16 | kind u16 | payload length u32 | payload | sha256(all before)

Kinds: INTENT (everything recovery needs: before- and after-image of the SIF metadata
[0, DataOffset), the appended blobs with offsets/sizes/digests and the bytes of the small
ones, the ranges to free, old/new file length), BLOBS_DURABLE, COMMITTED. The entry is
unlinked (plus directory fsync) when the operation is done. A record whose header, length
or checksum is wrong ends the entry: a torn tail means "that step never happened"; an
entry whose INTENT is torn is *void* (the image was never touched, R1 orders INTENT first).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Final

from sifoverlay.errors import JournalError
from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)

MAGIC: Final = b"SOVJ"
VERSION: Final = 1
SUFFIX: Final = ".sovj"
RECORD_HEADER: Final = struct.Struct("<4sHHI")
CHECKSUM_SIZE: Final = 32
MAX_PAYLOAD: Final = 64 << 20
ENV_JOURNAL_DIR: Final = "SIFOVERLAY_JOURNAL_DIR"
ROOT_JOURNAL_DIR: Final = "/var/lib/sifoverlay/journal"


class Kind(enum.IntEnum):
    INTENT = 1
    BLOBS_DURABLE = 2
    COMMITTED = 3


def default_journal_dir() -> str:
    """$SIFOVERLAY_JOURNAL_DIR, else ``journal/`` in the state directory
    (engine/statedir.py: /var/lib/sifoverlay/journal for root, else
    $XDG_STATE_HOME/sifoverlay/journal, XDG default ~/.local/state)."""
    from . import statedir

    env = os.environ.get(ENV_JOURNAL_DIR)
    if env:
        return os.path.abspath(env)
    return os.path.join(statedir.default_dir(), "journal")


def image_key(image: str | os.PathLike[str]) -> str:
    """The identity key of an image (engine/statedir.py): entry names start with it, so a
    rename or hard link of the image keeps its entries, and two images never share them.
    The image is opened checked (no symlink followed); OSError when it cannot be."""
    from . import statedir

    return statedir.key_of_path(os.fspath(image))


@dataclass(frozen=True, slots=True)
class BlobPlacement:
    """A blob the operation appends: where, how long, which digest."""

    offset: int
    size: int
    digest: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class Intent:
    """The complete plan of one operation, written before the image changes (R1)."""

    op_id: str
    op: str  # "create" | "sync" | "seal"
    image: str  # real path
    dev: int
    ino: int
    old_length: int
    new_length: int
    old_root_digest: str | None
    new_root_digest: str
    appended: tuple[BlobPlacement, ...]
    freed: tuple[tuple[int, int], ...]  # (offset, size) of objects deleted by the commit
    before: bytes = field(repr=False)  # [0, DataOffset) now
    after: bytes = field(repr=False)  # [0, DataOffset) after the commit
    small_blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # digest -> bytes
    job: str | None = None
    host: str = ""
    pid: int = 0
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. new overlay digest
    key: str = ""  # identity key of the image (engine/statedir.py); the entry name starts with it
    # (offset, size) inside LIVE objects to punch after the commit point (compact: free ext3
    # blocks, whose zeros the committed digest already counts); done by GC, so by recovery too
    zeroed: tuple[tuple[int, int], ...] = ()

    def encode(self) -> bytes:
        sections: list[tuple[str, bytes]] = [("before", self.before), ("after", self.after)]
        sections += [(f"blob:{digest}", raw) for digest, raw in self.small_blobs.items()]
        meta = {
            "op_id": self.op_id, "op": self.op, "image": self.image, "dev": self.dev, "ino": self.ino,
            "old_length": self.old_length, "new_length": self.new_length,
            "old_root_digest": self.old_root_digest, "new_root_digest": self.new_root_digest,
            "appended": [[b.offset, b.size, b.digest] for b in self.appended],
            "freed": [list(r) for r in self.freed],
            "before_sha256": hashlib.sha256(self.before).hexdigest(),
            "job": self.job, "host": self.host, "pid": self.pid, "created": self.created,
            "extra": self.extra, "key": self.key,
            "sections": [[name, len(raw)] for name, raw in sections],
        }
        if self.zeroed:
            meta["zeroed"] = [list(r) for r in self.zeroed]
        text = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return struct.pack("<I", len(text)) + text + b"".join(raw for _, raw in sections)

    @classmethod
    def decode(cls, payload: bytes) -> Intent:
        (length,) = struct.unpack_from("<I", payload, 0)
        meta = json.loads(payload[4 : 4 + length].decode("utf-8"))
        pos = 4 + length
        raw_sections: dict[str, bytes] = {}
        for name, size in meta["sections"]:
            raw_sections[name] = payload[pos : pos + size]
            pos += size
        if pos != len(payload):
            raise ValueError("section lengths do not add up")
        return cls(
            op_id=meta["op_id"], op=meta["op"], image=meta["image"], dev=meta["dev"], ino=meta["ino"],
            old_length=meta["old_length"], new_length=meta["new_length"],
            old_root_digest=meta["old_root_digest"], new_root_digest=meta["new_root_digest"],
            appended=tuple(BlobPlacement(int(o), int(s), str(d)) for o, s, d in meta["appended"]),
            freed=tuple((int(o), int(s)) for o, s in meta["freed"]),
            before=raw_sections["before"], after=raw_sections["after"],
            small_blobs={k[5:]: v for k, v in raw_sections.items() if k.startswith("blob:")},
            job=meta.get("job"), host=meta.get("host", ""), pid=int(meta.get("pid", 0)),
            created=float(meta.get("created", 0.0)), extra=dict(meta.get("extra") or {}),
            key=str(meta.get("key") or ""),
            zeroed=tuple((int(o), int(n)) for o, n in meta.get("zeroed") or ()),
        )


def encode_record(kind: Kind, payload: bytes) -> bytes:
    head = RECORD_HEADER.pack(MAGIC, VERSION, int(kind), len(payload))
    return head + payload + hashlib.sha256(head + payload).digest()


def decode_records(raw: bytes) -> tuple[list[tuple[Kind, bytes]], int]:
    """Valid records from the start of `raw` and the offset where validity ends."""
    out: list[tuple[Kind, bytes]] = []
    pos = 0
    while pos + RECORD_HEADER.size + CHECKSUM_SIZE <= len(raw):
        magic, version, kind, length = RECORD_HEADER.unpack_from(raw, pos)
        if magic != MAGIC or version != VERSION or length > MAX_PAYLOAD:
            break
        end = pos + RECORD_HEADER.size + length
        if end + CHECKSUM_SIZE > len(raw):
            break
        if hashlib.sha256(raw[pos:end]).digest() != raw[end : end + CHECKSUM_SIZE]:
            break
        try:
            out.append((Kind(kind), raw[pos + RECORD_HEADER.size : end]))
        except ValueError:
            break
        pos = end + CHECKSUM_SIZE
    return out, pos


@dataclass(frozen=True, slots=True)
class Entry:
    """A pending entry as found on disk. `intent` None = void (torn INTENT)."""

    path: str
    key: str
    intent: Intent | None
    state: Kind | None
    valid_end: int
    mtime: float

    @property
    def op_id(self) -> str:
        return os.path.basename(self.path)[len(self.key) + 1 : -len(SUFFIX)]

    @property
    def owner_pid(self) -> int | None:
        """Pid of the writer, parsed from the op id (``<ms>-<host>-<pid>-<rand>``)."""
        parts = self.op_id.split("-")
        return int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None


def new_op_id() -> str:
    # os.urandom, not secrets (hmac, random, base64: ms of imports on every commit, issue 17)
    host = "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"
    return f"{int(time.time() * 1000)}-{host}-{os.getpid()}-{os.urandom(3).hex()}"


class EntryWriter:
    """The open entry of a running operation (records appended through one fd)."""

    def __init__(self, journal: Journal, path: str, fd: int, end: int) -> None:
        self.journal = journal
        self.path = path
        self.fd = fd
        self.end = end

    def mark(self, kind: Kind, op_id: str) -> None:
        record = encode_record(kind, json.dumps({"op_id": op_id}).encode())
        io = self.journal.io
        io.pwrite(self.fd, record, self.end)
        io.fsync(self.fd)
        self.end += len(record)

    def finish(self) -> None:
        """Operation complete: remove the entry durably."""
        io = self.journal.io
        io.close(self.fd)
        self.fd = -1
        io.unlink(self.path)
        io.fsync_dir(self.journal.directory)

    def abandon(self) -> None:
        """Close without removing (a crash-equivalent exit; recovery decides)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Journal:
    """The journal directory. Every mutation goes through `io`."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, io: FileIO = REAL_IO) -> None:
        self.directory = os.path.abspath(os.fspath(directory)) if directory is not None else default_journal_dir()
        self.io = io

    def entry_path(self, key: str, op_id: str) -> str:
        return os.path.join(self.directory, f"{key}.{op_id}{SUFFIX}")

    def begin(self, intent: Intent) -> EntryWriter:
        """Write the INTENT durably: record, fsync(file), fsync(dir) (R1)."""
        from . import statedir

        io = self.io
        try:
            statedir.ensure(self.directory, io=io, mode=0o700)
        except OSError as exc:
            raise JournalError(self.directory, f"cannot create the journal directory: {exc.strerror}") from exc
        path = self.entry_path(intent.key or image_key(intent.image), intent.op_id)
        record = encode_record(Kind.INTENT, intent.encode())
        try:
            fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(path, f"cannot create journal entry: {exc.strerror}") from exc
        try:
            io.pwrite(fd, record, 0)
            io.fsync(fd)
            io.fsync_dir(self.directory)
        except Exception:
            os.close(fd)
            raise
        log.debug("journal %s: INTENT %s for %s", path, intent.op, intent.image)
        return EntryWriter(self, path, fd, len(record))

    def append(self, entry: Entry, kind: Kind) -> Entry:
        """Append a marker to an entry found on disk (recovery), over any torn tail."""
        record = encode_record(kind, json.dumps({"op_id": entry.op_id}).encode())
        from sifoverlay.fsio import open_regular

        fd = open_regular(entry.path, os.O_WRONLY, io=self.io)
        try:
            self.io.pwrite(fd, record, entry.valid_end)
            self.io.fsync(fd)
        finally:
            self.io.close(fd)
        return Entry(entry.path, entry.key, entry.intent, kind, entry.valid_end + len(record), time.time())

    def remove(self, entry: Entry) -> None:
        try:
            self.io.unlink(entry.path)
        except FileNotFoundError:
            pass
        self.io.fsync_dir(self.directory)

    # -- reading -----------------------------------------------------------------------
    def read_entry(self, path: str) -> Entry | None:
        name = os.path.basename(path)
        from sifoverlay.fsio import open_regular

        try:
            fd = open_regular(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("journal entry %s: not a regular file (%s): ignored", path, exc.strerror)
            return None
        try:
            mtime = os.fstat(fd).st_mtime
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
        finally:
            os.close(fd)
        records, valid_end = decode_records(raw)
        key = name.split(".", 1)[0]
        intent: Intent | None = None
        state: Kind | None = None
        if records and records[0][0] == Kind.INTENT:
            try:
                intent = Intent.decode(records[0][1])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
                log.warning("journal entry %s: unreadable INTENT (%s): void", path, exc)
            else:
                state = max(kind for kind, _ in records)
        if intent is None:
            valid_end = 0
        return Entry(path, key, intent, state, valid_end, mtime)

    def pending(self, image: str | os.PathLike[str] | None = None, *, key: str | None = None) -> list[Entry]:
        """Entries not yet finished, oldest first; only those of the image named by `key`
        (or by the path `image`, opened checked) when given."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        if key is None and image is not None:
            try:
                key = image_key(image)
            except OSError:
                return []
        prefix = f"{key}." if key is not None else ""
        out = []
        for name in sorted(names):
            if name.endswith(SUFFIX) and name.startswith(prefix) and not name.startswith("."):
                entry = self.read_entry(os.path.join(self.directory, name))
                if entry is not None:
                    out.append(entry)
        out.sort(key=lambda e: e.op_id)
        return out

    def oldest_age(self, *, now: float | None = None) -> float | None:
        """Seconds since the oldest pending entry was written (None: nothing pending)."""
        entries = self.pending()
        if not entries:
            return None
        now = time.time() if now is None else now
        return max(0.0, now - min(e.mtime for e in entries))
