"""Write a new SIF file (Go's createContainer): objects in order into slots 0..k-1,
then the descriptor table, then the header. The file appears atomically (temp file in
the same directory + rename), so a failure leaves no half-written image behind."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence

from ..errors import UsageError
from ..fsio import REAL_IO, FileIO
from .constants import DEFAULT_DESCRIPTORS_OFFSET, DETERMINISTIC_TIME
from .layout import Layout
from .writeout import ObjectInput, ensure_length, place_and_write, write_table_then_header

log = logging.getLogger(__name__)


def write_new(
    path: str | os.PathLike[str],
    objects: Sequence[ObjectInput],
    *,
    capacity: int | None = None,
    spare: int = 0,
    deterministic: bool = True,
    image_id: bytes | uuid.UUID | None = None,
    now: int | None = None,
    launch_script: bytes | str = b"",
    descriptors_offset: int = DEFAULT_DESCRIPTORS_OFFSET,
    durable: bool = True,
    io: FileIO = REAL_IO,
) -> Layout:
    """Create `path` holding `objects`; returns the final Layout.

    capacity: descriptor slots; default len(objects) + spare (Go's own default is 48:
      pass capacity=48 for a native-style image).
    deterministic (default): zero image id, all times = DETERMINISTIC_TIME, unless
      image_id / now are given explicitly. Otherwise a random id and the current time.
    durable: fsync the file and its directory.
    """
    name = os.fspath(path)
    if spare < 0:
        raise UsageError(name, f"spare slot count {spare} is negative")
    slots = len(objects) + spare if capacity is None else capacity
    if slots < len(objects):
        raise UsageError(name, f"capacity {slots} is smaller than the {len(objects)} objects to write")
    if isinstance(image_id, uuid.UUID):
        image_id = image_id.bytes
    if deterministic:
        stamp = DETERMINISTIC_TIME if now is None else int(now)
        ident = image_id if image_id is not None else bytes(16)
    else:
        stamp = int(time.time()) if now is None else int(now)
        ident = image_id if image_id is not None else uuid.uuid4().bytes
    layout = Layout.new(
        capacity=slots, launch_script=launch_script, image_id=ident, now=stamp, descriptors_offset=descriptors_offset, path=name
    )
    directory = os.path.dirname(os.path.abspath(name))
    tmp = os.path.join(directory, f".{os.path.basename(name)}.sifnew.{os.getpid()}")
    fd = io.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            for obj in objects:
                place_and_write(io, fd, layout, obj, stamp=stamp, path=name)
            write_table_then_header(io, fd, layout)
            ensure_length(io, fd, layout.file_length)
            if durable:
                io.fsync(fd)
        finally:
            io.close(fd)
        io.rename(tmp, name)
    except BaseException:
        try:
            io.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        io.fsync_dir(directory)
    log.debug("wrote %s: %d objects, %d slots", name, len(objects), slots)
    return layout
