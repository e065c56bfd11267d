"""Open and validate a SIF file: header, descriptor table, object placement.

Go's loader checks only magic and version and trusts the rest; we check everything a
later step relies on, so a damaged file is refused with one clear line instead of
being half-read or, worse, written through.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from typing import Final

from ..errors import SifFormatError
from ..fsio import REAL_IO, FileIO
from .constants import (
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_DESCRIPTORS,
    OCI_DATATYPES,
    VERSION,
    DataType,
)
from .descriptor import DESCRIPTOR_STRUCT, EMPTY_DESCRIPTOR, Descriptor
from .header import Header

log = logging.getLogger(__name__)

DEFAULT_CHUNK: Final = 4 << 20
DEFAULT_READ_CAP: Final = 64 << 20  # .read() is for JSON-sized objects, not layers

_EMPTY_FIELDS: Final = DESCRIPTOR_STRUCT.unpack(bytes(DESCRIPTOR_SIZE))
_HEADER_INT_FIELDS: Final = (
    "created_at",
    "modified_at",
    "descriptors_free",
    "descriptors_total",
    "descriptors_offset",
    "descriptors_size",
    "data_offset",
    "data_size",
)


def pread_exact(fd: int, length: int, offset: int, path: str) -> bytes:
    """Read exactly `length` bytes at `offset`; a short read means the file is truncated."""
    parts: list[bytes] = []
    remaining = length
    while remaining > 0:
        try:
            chunk = os.pread(fd, min(remaining, DEFAULT_CHUNK), offset)
        except OSError as exc:
            raise SifFormatError(path, f"cannot read {length} bytes at offset {offset}: {exc.strerror}") from exc
        if not chunk:
            raise SifFormatError(path, f"truncated: wanted {length} bytes at offset {offset}, file ends early")
        parts.append(chunk)
        offset += len(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def validate_header(header: Header, file_size: int, path: str) -> None:
    """Every header rule; raises SifFormatError naming the first violated one."""
    if header.magic != MAGIC:
        raise SifFormatError(path, f"not a SIF file: bad magic (no SIF_MAGIC at offset 32, found hex {header.magic.hex()})")
    if header.version != VERSION:
        raise SifFormatError(path, f"unsupported SIF version {header.version!r} (only '01' is known)")
    for field in _HEADER_INT_FIELDS[2:]:
        if getattr(header, field) < 0:
            raise SifFormatError(path, f"header field {field} is negative ({getattr(header, field)})")
    total = header.descriptors_total
    if total > MAX_DESCRIPTORS:
        raise SifFormatError(path, f"descriptor count {total} is implausible (limit {MAX_DESCRIPTORS})")
    if header.descriptors_size != total * DESCRIPTOR_SIZE:
        raise SifFormatError(
            path, f"descriptor table size {header.descriptors_size} != {total} descriptors x {DESCRIPTOR_SIZE}"
        )
    if header.descriptors_free > total:
        raise SifFormatError(path, f"{header.descriptors_free} free descriptors claimed but only {total} exist")
    if header.descriptors_offset < HEADER_SIZE:
        raise SifFormatError(path, f"descriptor table offset {header.descriptors_offset} overlaps the header")
    if header.table_end > file_size:
        raise SifFormatError(
            path,
            f"descriptor table [{header.descriptors_offset}, {header.table_end}) extends past the end of the file ({file_size} bytes)",
        )
    if header.data_offset < header.table_end:
        raise SifFormatError(path, f"data offset {header.data_offset} lies inside the descriptor table (ends at {header.table_end})")
    if header.data_offset + header.data_size > file_size:
        raise SifFormatError(
            path,
            f"data section [{header.data_offset}, {header.data_offset + header.data_size}) extends past the end of the file ({file_size} bytes)",
        )


def validate_descriptors(header: Header, descriptors: list[Descriptor], file_size: int, path: str) -> None:
    """Every per-object rule plus the cross-object ones (free count, overlap, root index)."""
    used: list[Descriptor] = []
    for slot, desc in enumerate(descriptors):
        if not desc.is_used:
            continue
        where = f"object {desc.id} (slot {slot})"
        if desc.id != slot + 1:
            raise SifFormatError(path, f"descriptor in slot {slot} has id {desc.id}, expected {slot + 1}")
        if desc.offset < 0 or desc.size < 0 or desc.size_with_padding < 0:
            raise SifFormatError(
                path, f"{where} has a negative offset/size ({desc.offset}/{desc.size}/{desc.size_with_padding})"
            )
        if desc.offset < header.data_offset:
            raise SifFormatError(path, f"{where} at offset {desc.offset} lies before the data section ({header.data_offset})")
        if desc.end > file_size:
            raise SifFormatError(
                path, f"{where} [{desc.offset}, {desc.end}) extends past the end of the file ({file_size} bytes)"
            )
        if desc.datatype in OCI_DATATYPES and desc.digest is None:
            text = desc.extra.split(b"\x00", 1)[0][:80]
            raise SifFormatError(path, f"{where} ({desc.datatype_label}) has no valid sha256 digest in its extra field: {text!r}")
        used.append(desc)
    free = len(descriptors) - len(used)
    if header.descriptors_free != free:
        raise SifFormatError(path, f"header says {header.descriptors_free} free descriptors but {free} slots are unused")
    if used:
        data_end = max(d.end for d in used)
        if header.data_offset + header.data_size < data_end:
            raise SifFormatError(
                path, f"header data size {header.data_size} ends before the furthest object (ends at {data_end})"
            )
    previous: Descriptor | None = None
    for desc in sorted((d for d in used if d.size > 0), key=lambda d: (d.offset, d.id)):
        if previous is not None and desc.offset < previous.end:
            raise SifFormatError(
                path,
                f"objects {previous.id} [{previous.offset}, {previous.end}) and {desc.id} [{desc.offset}, {desc.end}) overlap",
            )
        previous = desc
    roots = [d.id for d in used if d.datatype == DataType.OCI_ROOT_INDEX]
    if len(roots) > 1:
        raise SifFormatError(path, f"more than one OCI root index (objects {', '.join(map(str, roots))})")


class SifFile:
    """An open, validated SIF. Holds the fd until close(); reads stream from it."""

    def __init__(self, fd: int, path: str, header: Header, descriptors: list[Descriptor], st: os.stat_result) -> None:
        self.fd = fd
        self.path = path
        self.header = header
        self.descriptors = descriptors
        self.stat = st
        self.writable = False

    # -- construction ---------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False, io: FileIO = REAL_IO) -> SifFile:
        """Open and validate `path`; SifFormatError on any problem (the fd is then closed).
        Never follows a symlink at the last component (O_NOFOLLOW) and never blocks on a
        FIFO or device (O_NONBLOCK; only a regular file is accepted). Root-side callers
        open images through engine.statedir.open_image_checked (no symlink anywhere)
        and hand the fd to `from_fd`."""
        name = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = io.open(name, flags) if writable else os.open(name, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SifFormatError(name, "cannot open: is a symbolic link (give the image's real path)",
                                     errno=exc.errno) from exc
            raise SifFormatError(name, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
        sif = cls.from_fd(fd, name)
        try:
            os.set_blocking(sif.fd, True)
        except OSError:
            pass
        sif.writable = writable
        return sif

    @classmethod
    def from_fd(cls, fd: int, path: str | os.PathLike[str]) -> SifFile:
        """Validate an already-open fd (takes ownership: closed on failure and on close())."""
        name = os.fspath(path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SifFormatError(name, "not a regular file")
            size = st.st_size
            if size < HEADER_SIZE:
                raise SifFormatError(name, f"truncated: {size} bytes, a SIF header needs {HEADER_SIZE}")
            header = Header.unpack(pread_exact(fd, HEADER_SIZE, 0, name))
            validate_header(header, size, name)
            table = pread_exact(fd, header.descriptors_size, header.descriptors_offset, name)
            # unused all-zero slots share one immutable record: most of a table is empty
            descriptors = [
                EMPTY_DESCRIPTOR if fields == _EMPTY_FIELDS else Descriptor(*fields)
                for fields in DESCRIPTOR_STRUCT.iter_unpack(table)
            ]
            validate_descriptors(header, descriptors, size, name)
        except BaseException:
            os.close(fd)
            raise
        log.debug("opened %s: %d/%d descriptors used", name, header.descriptors_total - header.descriptors_free, header.descriptors_total)
        return cls(fd, name, header, descriptors, st)

    # -- queries --------------------------------------------------------------------
    def used(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.is_used]

    def by_id(self, object_id: int) -> Descriptor:
        if 1 <= object_id <= len(self.descriptors):
            desc = self.descriptors[object_id - 1]
            if desc.is_used:
                return desc
        raise SifFormatError(self.path, f"no object with id {object_id}")

    def read(self, desc: Descriptor, *, limit: int = DEFAULT_READ_CAP) -> bytes:
        """All bytes of a small object; refuses objects larger than `limit`."""
        if desc.size > limit:
            raise SifFormatError(self.path, f"object {desc.id} is {desc.size} bytes, more than the {limit} byte read limit")
        return pread_exact(self.fd, desc.size, desc.offset, self.path)

    def iter_chunks(self, desc: Descriptor, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """Stream an object's bytes in chunks of at most `chunk`."""
        offset, end = desc.offset, desc.end
        while offset < end:
            n = min(chunk, end - offset)
            yield pread_exact(self.fd, n, offset, self.path)
            offset += n

    def metadata_bytes(self) -> bytes:
        """The bytes [0, DataOffset): header, gap, descriptor table."""
        return pread_exact(self.fd, self.header.data_offset, 0, self.path)

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SifFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SifFile({self.path!r}, {len(self.used())}/{self.header.descriptors_total} used)"
