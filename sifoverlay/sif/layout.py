"""An in-memory, mutable copy of the SIF metadata (header + descriptor table).

Pure: no file is touched. Callers plan a change here, then write `metadata_bytes()`
(the after-image of [0, DataOffset)) and any object data through the I/O seam.
Placement and bookkeeping follow sylabs/sif >= 2.18 (spec §1.6-1.7).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import CapacityError, UsageError
from .constants import (
    ARCH_UNKNOWN,
    DEFAULT_CAPACITY,
    DEFAULT_DESCRIPTORS_OFFSET,
    DEFAULT_GROUP,
    DEFAULT_PARTITION_ALIGNMENT,
    DESCRIPTOR_SIZE,
    DETERMINISTIC_TIME,
    EXTRA_SIZE,
    GROUP_MASK,
    HEADER_SIZE,
    LAUNCH_SCRIPT_SIZE,
    NAME_SIZE,
    OCI_DATATYPES,
    DataType,
    PartType,
)
from .descriptor import PARTITION_EXTRA, Descriptor, encode_digest
from .header import Header

if TYPE_CHECKING:
    from .load import SifFile


def next_aligned(offset: int, alignment: int) -> int:
    """Go's nextAligned: round up with a power-of-two mask (0 = unaligned)."""
    if alignment and offset % alignment:
        return (offset & ~(alignment - 1)) + alignment
    return offset


def _as_bytes(value: bytes | str, size: int, what: str) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > size:
        raise UsageError(None, f"{what} is {len(raw)} bytes, the limit is {size}")
    return raw.ljust(size, b"\x00")


class Layout:
    """Header + descriptor table being planned. `path` only names the file in errors."""

    def __init__(self, header: Header, descriptors: Iterable[Descriptor], *, base: bytes | None = None, path: str | None = None) -> None:
        self._header = header
        self._descriptors = list(descriptors)
        self._deterministic = header.is_deterministic
        # Bytes of [0, DataOffset) outside header and table (normally zero) are kept as read.
        self._base = base if base is not None else bytes(header.data_offset)
        self.path = path

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_file(cls, sif: SifFile) -> Layout:
        return cls(sif.header, sif.descriptors, base=sif.metadata_bytes(), path=sif.path)

    @classmethod
    def new(
        cls,
        *,
        capacity: int = DEFAULT_CAPACITY,
        launch_script: bytes | str = b"",
        image_id: bytes = bytes(16),
        now: int = DETERMINISTIC_TIME,
        descriptors_offset: int = DEFAULT_DESCRIPTORS_OFFSET,
        path: str | None = None,
    ) -> Layout:
        """An empty container as Go's createContainer builds it."""
        if capacity < 0:
            raise UsageError(path, f"descriptor capacity {capacity} is negative")
        script = _as_bytes(launch_script, LAUNCH_SCRIPT_SIZE, "launch script")
        if script[-1] != 0:
            raise UsageError(path, f"launch script must be shorter than {LAUNCH_SCRIPT_SIZE} bytes")
        if len(image_id) != 16:
            raise UsageError(path, "image id must be 16 bytes")
        if descriptors_offset < HEADER_SIZE:
            raise UsageError(path, f"descriptor table offset {descriptors_offset} overlaps the header")
        table_size = capacity * DESCRIPTOR_SIZE
        header = Header(
            launch_script=script,
            image_id=bytes(image_id),
            created_at=now,
            modified_at=now,
            descriptors_free=capacity,
            descriptors_total=capacity,
            descriptors_offset=descriptors_offset,
            descriptors_size=table_size,
            data_offset=descriptors_offset + table_size,
            data_size=0,
        )
        return cls(header, [Descriptor()] * capacity, path=path)

    # -- views ------------------------------------------------------------------------
    @property
    def header(self) -> Header:
        return self._header

    @property
    def descriptors(self) -> list[Descriptor]:
        return list(self._descriptors)

    def used(self) -> list[Descriptor]:
        return [d for d in self._descriptors if d.is_used]

    @property
    def free_slots(self) -> int:
        return sum(1 for d in self._descriptors if not d.is_used)

    @property
    def data_end(self) -> int:
        """End of the furthest live object (DataOffset when there is none)."""
        return max((d.end for d in self._descriptors if d.is_used), default=self._header.data_offset)

    @property
    def file_length(self) -> int:
        """Length of the file the header describes (DataOffset + DataSize)."""
        return self._header.data_offset + self._header.data_size

    @property
    def deterministic(self) -> bool:
        return self._deterministic

    def get(self, object_id: int) -> Descriptor:
        if 1 <= object_id <= len(self._descriptors) and self._descriptors[object_id - 1].is_used:
            return self._descriptors[object_id - 1]
        raise UsageError(self.path, f"no object with id {object_id}")

    def metadata_bytes(self) -> bytes:
        """The full after-image of [0, DataOffset): header, gap, table, gap."""
        h = self._header
        table = b"".join(d.pack() for d in self._descriptors)
        return h.pack() + self._base[HEADER_SIZE : h.descriptors_offset] + table + self._base[h.table_end : h.data_offset]

    def stamp(self, now: int | None = None) -> int:
        """The time Go would record: `now` if given, else the zero time for a
        deterministic image, else the current time."""
        if now is not None:
            return int(now)
        return DETERMINISTIC_TIME if self._deterministic else int(time.time())

    # -- verbs ------------------------------------------------------------------------
    def add(
        self,
        datatype: int,
        size: int,
        *,
        digest: str | None = None,
        group: int = DEFAULT_GROUP,
        link: int = 0,
        link_is_group: bool = False,
        name: bytes | str = b"",
        extra: bytes | None = None,
        alignment: int | None = 0,
        now: int | None = None,
    ) -> Descriptor:
        """Plan a new object of `size` bytes in the first free slot, right after the
        furthest live object (aligned). Returns its descriptor; the caller writes the data
        at `.offset`. `alignment=None` means Go's default (4096 for partitions, else 0)."""
        if size < 0:
            raise UsageError(self.path, f"object size {size} is negative")
        if alignment is None:
            alignment = DEFAULT_PARTITION_ALIGNMENT if datatype == DataType.PARTITION else 0
        if alignment < 0 or (alignment & (alignment - 1)):
            raise UsageError(self.path, f"alignment {alignment} is not zero or a power of two")
        slot = next((i for i, d in enumerate(self._descriptors) if not d.is_used), None)
        if slot is None:
            raise CapacityError(
                self.path, f"no free descriptor slot (all {len(self._descriptors)} used)", needed=1, free=0
            )
        if datatype in OCI_DATATYPES:
            if digest is None:
                raise UsageError(self.path, f"an object of type {datatype:#x} needs a digest")
            if extra is not None:
                raise UsageError(self.path, "give either digest or extra, not both")
            try:
                extra_raw = encode_digest(digest)
            except ValueError as exc:
                raise UsageError(self.path, str(exc)) from exc
        else:
            if digest is not None:
                raise UsageError(self.path, f"objects of type {datatype:#x} carry no digest")
            extra_raw = _as_bytes(extra or b"", EXTRA_SIZE, "extra")
        header = self._header
        if datatype == DataType.PARTITION:
            _, part_type, arch = PARTITION_EXTRA.unpack_from(extra_raw)
            if part_type == PartType.PRIMSYS:
                if any(d.is_used and d.is_primary_partition for d in self._descriptors):
                    raise UsageError(self.path, "image already has a primary system partition")
                header = header.replace(arch=arch)
        if not 0 <= group < GROUP_MASK or not 0 <= link < GROUP_MASK:
            raise UsageError(self.path, f"group {group} / link {link} out of range")
        stamp = self.stamp(now)
        unaligned = self.data_end
        offset = next_aligned(unaligned, alignment)
        desc = Descriptor(
            datatype=int(datatype),
            used=1,
            id=slot + 1,
            group_id=group | GROUP_MASK,
            linked_id=(link | GROUP_MASK) if link_is_group else link,
            offset=offset,
            size=size,
            size_with_padding=offset - unaligned + size,
            created_at=stamp,
            modified_at=stamp,
            name=_as_bytes(name, NAME_SIZE, "name"),
            extra=extra_raw,
        )
        self._descriptors[slot] = desc
        self._header = header.replace(
            descriptors_free=header.descriptors_free - 1,
            data_size=desc.end - header.data_offset,
            modified_at=stamp,
        )
        return desc

    def delete(self, object_id: int, *, now: int | None = None) -> Descriptor:
        """Free an object's slot (Go's per-object delete step + ModifiedAt); returns the
        removed descriptor. DataSize is unchanged until compact()."""
        desc = self.get(object_id)
        header = self._header
        if desc.is_primary_partition:
            header = header.replace(arch=ARCH_UNKNOWN)
        self._descriptors[object_id - 1] = Descriptor()
        self._header = header.replace(descriptors_free=header.descriptors_free + 1, modified_at=self.stamp(now))
        return desc

    def compact(self) -> int:
        """DataSize = end of the furthest live object; returns the new file length."""
        self._header = self._header.replace(data_size=self.data_end - self._header.data_offset)
        return self.file_length

    def set_extra(self, object_id: int, extra: bytes, *, now: int | None = None) -> Descriptor:
        """Go's SetMetadata: replace one descriptor's Extra and stamp ModifiedAt."""
        desc = self.get(object_id)
        stamp = self.stamp(now)
        new = desc.replace(extra=_as_bytes(extra, EXTRA_SIZE, "extra"), modified_at=stamp)
        self._descriptors[object_id - 1] = new
        self._header = self._header.replace(modified_at=stamp)
        return new

    def set_oci_digest(self, object_id: int, digest: str, *, now: int | None = None) -> Descriptor:
        """Go's SetOCIBlobDigest: only for OCI root index / blob objects."""
        desc = self.get(object_id)
        if desc.datatype not in OCI_DATATYPES:
            raise UsageError(self.path, f"object {object_id} is {desc.datatype_label}, not an OCI blob or root index")
        try:
            extra = encode_digest(digest)
        except ValueError as exc:
            raise UsageError(self.path, str(exc)) from exc
        return self.set_extra(object_id, extra, now=now)
