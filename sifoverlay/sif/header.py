"""The 128-byte SIF global header (spec §1.1)."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import uuid

from .constants import (
    ARCH_UNKNOWN,
    DESCRIPTOR_SIZE,
    DETERMINISTIC_TIME,
    HEADER_SIZE,
    LAUNCH_SCRIPT_SIZE,
    MAGIC,
    VERSION,
    arch_name,
)

# launch script, magic, version, arch, id, then 8 int64: created, modified,
# descriptors free/total/offset/size, data offset/size.
HEADER_STRUCT: Final = struct.Struct("<32s10s3s3s16s8q")
assert HEADER_STRUCT.size == HEADER_SIZE


@dataclass(frozen=True, slots=True)
class Header:
    launch_script: bytes = bytes(LAUNCH_SCRIPT_SIZE)
    magic: bytes = MAGIC
    version: bytes = VERSION
    arch: bytes = ARCH_UNKNOWN
    image_id: bytes = bytes(16)
    created_at: int = DETERMINISTIC_TIME
    modified_at: int = DETERMINISTIC_TIME
    descriptors_free: int = 0
    descriptors_total: int = 0
    descriptors_offset: int = 0
    descriptors_size: int = 0
    data_offset: int = 0
    data_size: int = 0

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Header:
        """Decode exactly HEADER_SIZE bytes (no validation: see load.SifFile.open)."""
        if len(raw) != HEADER_SIZE:
            raise ValueError(f"header needs {HEADER_SIZE} bytes, got {len(raw)}")
        return cls(*HEADER_STRUCT.unpack(raw))

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(
            self.launch_script,
            self.magic,
            self.version,
            self.arch,
            self.image_id,
            self.created_at,
            self.modified_at,
            self.descriptors_free,
            self.descriptors_total,
            self.descriptors_offset,
            self.descriptors_size,
            self.data_offset,
            self.data_size,
        )

    def replace(self, **changes: object) -> Header:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # -- derived views ------------------------------------------------------------------
    @property
    def table_end(self) -> int:
        return self.descriptors_offset + self.descriptors_size

    @property
    def launch_script_str(self) -> str:
        return self.launch_script.rstrip(b"\x00").decode("utf-8", "replace")

    @property
    def version_str(self) -> str:
        return self.version.rstrip(b"\x00").decode("ascii", "replace")

    @property
    def arch_name(self) -> str:
        return arch_name(self.arch)

    @property
    def uuid(self) -> uuid.UUID:
        import uuid  # here, not at module level: it imports platform (issue 17, fast CLI)

        return uuid.UUID(bytes=bytes(self.image_id))

    @property
    def is_deterministic(self) -> bool:
        """Go's FileImage.isDeterministic: zero id and both times = zero time."""
        return (
            self.image_id == bytes(16)
            and self.created_at == DETERMINISTIC_TIME
            and self.modified_at == DETERMINISTIC_TIME
        )

    @staticmethod
    def table_size(total: int) -> int:
        return total * DESCRIPTOR_SIZE
