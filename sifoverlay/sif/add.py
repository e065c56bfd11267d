"""Add one object to an existing SIF (Go's AddObject): first free slot, data right
after the furthest live object, then the descriptor table, then the header.

Not crash-safe (neither is Go's); the engine never uses this on a live image."""

from __future__ import annotations

import os

from ..fsio import REAL_IO, FileIO
from .descriptor import Descriptor
from .layout import Layout
from .load import SifFile
from .writeout import ObjectInput, ensure_length, place_and_write, write_table_then_header


def add_object(
    path: str | os.PathLike[str],
    obj: ObjectInput,
    *,
    now: int | None = None,
    durable: bool = True,
    io: FileIO = REAL_IO,
) -> Descriptor:
    """Append `obj` to the SIF at `path`; returns its descriptor. Validation (capacity,
    second primary partition, digest mismatch...) happens before the header changes;
    a refused add leaves metadata and length as they were."""
    with SifFile.open(path, writable=True, io=io) as sif:
        layout = Layout.from_file(sif)
        stamp = layout.stamp(now)
        old_length = sif.stat.st_size
        try:
            object_id = place_and_write(io, sif.fd, layout, obj, stamp=stamp, path=sif.path)
        except BaseException:
            if os.fstat(sif.fd).st_size > old_length:
                io.truncate(sif.fd, old_length)
            raise
        write_table_then_header(io, sif.fd, layout)
        ensure_length(io, sif.fd, layout.file_length)
        if durable:
            io.fsync(sif.fd)
        return layout.get(object_id)
