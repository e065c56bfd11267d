"""Shared write steps of the Go-compatible verbs (create, add, delete, set).

All writes go through the `FileIO` seam. Object data is streamed, never loaded whole.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Final, Union

from ..errors import SifFormatError, UsageError
from ..fsio import FileIO
from .constants import DEFAULT_GROUP, HEADER_SIZE, OCI_DATATYPES
from .layout import Layout

CHUNK: Final = 4 << 20
ZERO_CHUNK: Final = bytes(1 << 20)

DataSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


@dataclass(frozen=True, slots=True)
class ObjectInput:
    """One object to write: its type, its bytes (in memory or a file path to stream
    from) and descriptor options with Go's defaults (group 1, no link, empty name,
    alignment None = 4096 for partitions, else 0)."""

    datatype: int
    data: DataSource
    group: int = DEFAULT_GROUP
    link: int = 0
    link_is_group: bool = False
    name: bytes | str = b""
    extra: bytes | None = None
    digest: str | None = None  # OCI types: computed from the data when None
    alignment: int | None = None

    def size(self) -> int:
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            return len(self.data)
        try:
            return os.stat(self.data).st_size
        except OSError as exc:
            raise UsageError(os.fspath(self.data), f"cannot read object data: {exc.strerror}") from exc


def stream_object(io: FileIO, fd: int, obj: ObjectInput, offset: int, size: int, path: str) -> str:
    """Write exactly `size` bytes of `obj` at `offset`; returns their sha256 digest."""
    hasher = hashlib.sha256()
    if isinstance(obj.data, (bytes, bytearray, memoryview)):
        view = memoryview(obj.data)
        for start in range(0, size, CHUNK):
            piece = view[start : start + CHUNK]
            hasher.update(piece)
            io.pwrite(fd, piece, offset + start)
        return "sha256:" + hasher.hexdigest()
    src_path = os.fspath(obj.data)
    with open(src_path, "rb") as src:
        written = 0
        while written < size:
            block = src.read(min(CHUNK, size - written))
            if not block:
                raise SifFormatError(src_path, f"object data shrank while copying ({written} of {size} bytes)")
            hasher.update(block)
            io.pwrite(fd, block, offset + written)
            written += len(block)
    return "sha256:" + hasher.hexdigest()


def zero_range(io: FileIO, fd: int, offset: int, length: int) -> None:
    """Overwrite [offset, offset+length) with zeros (Go's OptDeleteZero)."""
    end = offset + length
    while offset < end:
        n = min(len(ZERO_CHUNK), end - offset)
        io.pwrite(fd, ZERO_CHUNK[:n], offset)
        offset += n


def write_table_then_header(io: FileIO, fd: int, layout: Layout) -> None:
    """Go's order: the whole descriptor table, then the 128-byte header."""
    image = layout.metadata_bytes()
    h = layout.header
    io.pwrite(fd, image[h.descriptors_offset : h.table_end], h.descriptors_offset)
    io.pwrite(fd, image[:HEADER_SIZE], 0)


PLACEHOLDER_DIGEST: Final = "sha256:" + "0" * 64


def place_and_write(io: FileIO, fd: int, layout: Layout, obj: ObjectInput, *, stamp: int, path: str) -> int:
    """Plan `obj` in `layout`, stream its bytes into the file and, for OCI types, record
    the digest of what was written (Go tees the stream into sha256). Returns the object id.
    A given `obj.digest` that does not match the bytes is refused."""
    size = obj.size()
    is_oci = obj.datatype in OCI_DATATYPES
    desc = layout.add(
        obj.datatype,
        size,
        digest=PLACEHOLDER_DIGEST if is_oci else None,
        group=obj.group,
        link=obj.link,
        link_is_group=obj.link_is_group,
        name=obj.name,
        extra=None if is_oci else obj.extra,
        alignment=obj.alignment,
        now=stamp,
    )
    actual = stream_object(io, fd, obj, desc.offset, size, path)
    if is_oci:
        if obj.digest is not None and obj.digest != actual:
            raise UsageError(path, f"object {desc.id}: given digest {obj.digest} does not match its bytes ({actual})")
        layout.set_oci_digest(desc.id, actual, now=stamp)
    return desc.id


def ensure_length(io: FileIO, fd: int, length: int) -> None:
    """Extend the file to `length` when a trailing empty object lies past its end, so
    the header never describes bytes the file does not have."""
    if os.fstat(fd).st_size < length:
        io.truncate(fd, length)
