"""Rewrite one descriptor's metadata (Go's SetMetadata / SetOCIBlobDigest): new Extra
and ModifiedAt for the object, then the whole table, then the header ModifiedAt.
Object data is never touched."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..fsio import REAL_IO, FileIO
from .descriptor import Descriptor
from .layout import Layout
from .load import SifFile
from .writeout import write_table_then_header


def set_oci_digest(
    path: str | os.PathLike[str], object_id: int, digest: str, *, now: int | None = None, durable: bool = True, io: FileIO = REAL_IO
) -> Descriptor:
    """Record `digest` (`sha256:<hex>`) as the OCI digest of object `object_id`."""
    return _edit_descriptor(path, lambda layout: layout.set_oci_digest(object_id, digest, now=now), durable=durable, io=io)


def set_metadata(
    path: str | os.PathLike[str], object_id: int, extra: bytes, *, now: int | None = None, durable: bool = True, io: FileIO = REAL_IO
) -> Descriptor:
    """Replace object `object_id`'s Extra field (<= 384 bytes, NUL padded)."""
    return _edit_descriptor(path, lambda layout: layout.set_extra(object_id, extra, now=now), durable=durable, io=io)


def _edit_descriptor(
    path: str | os.PathLike[str], change: Callable[[Layout], Descriptor], *, durable: bool, io: FileIO
) -> Descriptor:
    """Apply `change` to the in-memory table, then write table and header back in place."""
    with SifFile.open(path, writable=True, io=io) as sif:
        layout = Layout.from_file(sif)
        desc = change(layout)
        write_table_then_header(io, sif.fd, layout)
        if durable:
            io.fsync(sif.fd)
        return desc
