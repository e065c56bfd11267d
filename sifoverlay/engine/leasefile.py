"""Lease records on disk: the writer file ``<state>/leases/<key>.lease`` and the reader
files ``<key>.lease.r.<token>`` in the state directory (engine/statedir.py), never beside
the image: the image's directory belongs to its owner (docs/security.md). `<key>` is the
image's identity (``<fsid>-<ino>``), so a rename or hard link can neither split one
image's records nor alias two images.

A record is created complete or not at all: written to a unique temp file, fsynced, then
``link()``-ed to its name (fails with EEXIST when taken, on local filesystems and NFS
alike). A heartbeat rewrites it by temp file + rename. Temp and tomb files carry the
host and pid of their writer (``<lease>.<kind>.<host>.<pid>.<random>``) so that a
killed writer's leftovers can be swept (engine/leasestale.py). Records are read with
O_NOFOLLOW|O_NONBLOCK and must be regular files: nothing placed there can block a reader.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)

DEFAULT_TTL = 300.0  # seconds a lease lives without a heartbeat
DEFAULT_GRACE = 600.0  # extra seconds before a lease of ANOTHER host may be broken
TEMP_KINDS = ("new", "hb", "tomb")  # fresh record, heartbeat rewrite, file being broken

Region = tuple[int, int]  # (offset, size) of the locked byte range; size 0 = to EOF


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
        """The stale rule (engine/leasestale.py), judged now, with the default grace."""
        return self.is_alive()

    def is_alive(self, *, grace: float = DEFAULT_GRACE, now: float | None = None) -> bool:
        from .leasestale import holder_alive  # leasestale reads records through this module

        return holder_alive(self, grace=grace, now=now)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.acquired))
        return f"job {self.job_id} ({self.source}) on host {self.host} pid {self.pid} since {since}"

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "record"}
        out["region"] = list(self.region) if self.region else None
        out["alive"] = self.alive
        return out


LEASE_SUFFIX = ".lease"


def lease_path(
    image_path: str | os.PathLike[str] | None = None, *, fd: int | None = None, key: str | None = None,
    state_dir: str | None = None,
) -> str:
    """The writer lease file of an image in the state directory: ``<leases>/<key>.lease``.
    The key comes from `key`, else from the open `fd`, else from a checked open of
    `image_path` (statedir.open_image_checked: no symlink followed)."""
    from . import statedir

    if key is None:
        if fd is not None:
            key = statedir.identity_key(fd)
        elif image_path is not None:
            key = statedir.key_of_path(os.fspath(image_path))
        else:
            raise ValueError("lease_path needs an image, an fd or a key")
    return os.path.join(statedir.leases_dir(state_dir), f"{key}{LEASE_SUFFIX}")


def lease_paths(
    image_path: str | os.PathLike[str] | None = None, *, fd: int | None = None, key: str | None = None,
    state_dir: str | None = None,
) -> list[str]:
    """The writer lease file of an image in every state directory whose records count
    (ours first; an unprivileged caller also reads the root one)."""
    from . import statedir

    try:
        own = lease_path(image_path, fd=fd, key=key, state_dir=state_dir)
    except FileNotFoundError:
        return []  # no image, no lease of it
    name = os.path.basename(own)
    return [own] + [os.path.join(d, statedir.LEASES, name) for d in statedir.read_dirs(state_dir)[1:]]


def read_info(path: str) -> LeaseInfo | None:
    """The record at `path`, None when there is none. Opened O_NOFOLLOW|O_NONBLOCK and only
    a regular file counts (a FIFO or device there never blocks us). Torn or foreign
    content reads as a record of an unknown holder heartbeating at the mtime."""
    from sifoverlay.fsio import open_regular

    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: not a lease record (%s): ignored", path, exc.strerror)
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
        log.warning("%s: unreadable lease record, judging it by its mtime", path)
        record = {"host": "?", "pid": 0, "job_id": "?", "source": "unknown",
                  "acquired": st.st_mtime, "heartbeat": st.st_mtime, "ttl": DEFAULT_TTL}
    return LeaseInfo.from_record(record, path, st.st_ino)


def reader_infos(targets: str | list[str]) -> list[LeaseInfo]:
    """Reader records beside the writer lease file(s) `targets`, oldest first."""
    found: list[LeaseInfo | None] = []
    for base in [targets] if isinstance(targets, str) else targets:
        directory, prefix = os.path.dirname(base), os.path.basename(base) + ".r."
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        found += [read_info(os.path.join(directory, name)) for name in names if name.startswith(prefix)]
    return sorted((info for info in found if info is not None), key=lambda i: i.acquired)


def temp_name(target: str, kind: str) -> str:
    """A unique name beside `target` that tells who made it (see the module docstring)."""
    directory, name = os.path.split(target)
    return os.path.join(directory, f"{name}.{kind}.{os.uname().nodename}.{os.getpid()}.{os.urandom(4).hex()}")


def parse_temp_name(target: str, name: str) -> tuple[str, str, int] | None:
    """(kind, host, pid) of a temp/tomb file name of the lease file `target`, else None."""
    prefix = os.path.basename(target) + "."
    parts = name[len(prefix):].rsplit(".", 3) if name.startswith(prefix) else []
    if len(parts) != 4 or parts[0] not in TEMP_KINDS or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def write_record(path: str, record: dict[str, Any], *, io: FileIO = REAL_IO) -> None:
    """A new file holding the record, fsynced (O_EXCL: temp names are unique)."""
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        io.pwrite(fd, data, 0)
        io.fsync(fd)
    finally:
        io.close(fd)


def link_record(target: str, record: dict[str, Any], *, io: FileIO = REAL_IO) -> bool:
    """Create `target` holding `record` iff the name is free. True when we created it."""
    tmp = temp_name(target, "new")
    write_record(tmp, record, io=io)
    try:
        io.link(tmp, target)
        created = True
    except FileExistsError:
        created = False
    except OSError:
        # NFS may report an error for a link that did happen: trust the link count.
        created = os.stat(tmp).st_nlink == 2
        if not created:
            unlink_quietly(tmp, io=io)
            raise
    unlink_quietly(tmp, io=io)
    io.fsync_dir(os.path.dirname(target))
    return created


def replace_record(target: str, record: dict[str, Any], *, io: FileIO = REAL_IO) -> LeaseInfo:
    """Atomically replace the record at `target` (temp file + rename + dir fsync)."""
    tmp = temp_name(target, "hb")
    write_record(tmp, record, io=io)
    try:
        io.rename(tmp, target)
    except BaseException:
        unlink_quietly(tmp, io=io)
        raise
    io.fsync_dir(os.path.dirname(target))
    return LeaseInfo.from_record(record, target, os.stat(target).st_ino)


def unlink_quietly(path: str, *, io: FileIO = REAL_IO) -> None:
    try:
        io.unlink(path)
    except FileNotFoundError:
        pass
