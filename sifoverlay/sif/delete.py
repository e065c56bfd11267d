"""Delete objects from a SIF (Go's DeleteObjects), in Go's order: for each object
optionally zero its bytes, free its slot (resetting the header arch if it was the
primary partition); then ModifiedAt; then, with compact, DataSize = end of the
furthest live object and the file truncated there; then the table; then the header."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..fsio import REAL_IO, FileIO
from .layout import Layout
from .load import SifFile
from .writeout import write_table_then_header, zero_range


def delete_objects(
    path: str | os.PathLike[str],
    ids: Iterable[int],
    *,
    zero: bool = False,
    compact: bool = False,
    now: int | None = None,
    durable: bool = True,
    io: FileIO = REAL_IO,
) -> Layout:
    """Remove the objects `ids`; returns the final Layout. Unknown ids are refused
    before anything is written. Compact only trims trailing free space (objects never
    move), exactly like Go."""
    with SifFile.open(path, writable=True, io=io) as sif:
        layout = Layout.from_file(sif)
        wanted = list(dict.fromkeys(ids))
        targets = [layout.get(i) for i in wanted]  # raises before any write
        stamp = layout.stamp(now)
        for desc in targets:
            if zero:
                zero_range(io, sif.fd, desc.offset, desc.size)
            layout.delete(desc.id, now=stamp)
        if compact:
            io.truncate(sif.fd, layout.compact())
        write_table_then_header(io, sif.fd, layout)
        if durable:
            io.fsync(sif.fd)
        return layout
