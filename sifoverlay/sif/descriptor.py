"""One 585-byte SIF descriptor (spec §1.2) and its type-specific Extra field (§1.4)."""

from __future__ import annotations

import dataclasses
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

from .constants import (
    DESCRIPTOR_SIZE,
    ENTITY_SIZE,
    EXTRA_SIZE,
    FORMAT_TYPE_LABELS,
    FS_TYPE_LABELS,
    GROUP_MASK,
    HASH_TYPE_LABELS,
    MESSAGE_TYPE_LABELS,
    NAME_SIZE,
    OCI_DATATYPES,
    PART_TYPE_LABELS,
    SBOM_FORMAT_LABELS,
    DataType,
    FormatType,
    FsType,
    HashType,
    MessageType,
    PartType,
    SbomFormat,
    arch_name,
)

# datatype, used, id, group, link, then 7 int64 (offset, size, size with padding,
# created, modified, uid, gid), name, extra. `used` is kept as the raw byte (Go reads
# any non-zero byte as true) so re-packing reproduces the input exactly.
DESCRIPTOR_STRUCT: Final = struct.Struct("<iBIII7q128s384s")
assert DESCRIPTOR_STRUCT.size == DESCRIPTOR_SIZE

PARTITION_EXTRA: Final = struct.Struct("<ii3s")
INT32: Final = struct.Struct("<i")
TWO_INT32: Final = struct.Struct("<ii")
FINGERPRINT_SIZE: Final = 20

# What ggcr's v1.Hash accepts (only sha256 is a known algorithm there).
_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")


def parse_digest(extra: bytes) -> str | None:
    """The OCI digest text stored in an Extra field, or None when it is not valid."""
    text = bytes(extra).split(b"\x00", 1)[0]
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    return value if _DIGEST_RE.fullmatch(value) else None


def encode_digest(digest: str) -> bytes:
    """`sha256:<hex>` as 71 ASCII bytes NUL padded to the Extra size."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.encode("ascii").ljust(EXTRA_SIZE, b"\x00")


def partition_extra(fs_type: int, part_type: int, arch: bytes) -> bytes:
    return PARTITION_EXTRA.pack(int(fs_type), int(part_type), bytes(arch)).ljust(EXTRA_SIZE, b"\x00")


def signature_extra(hash_type: int, entity: bytes = b"") -> bytes:
    if len(entity) > ENTITY_SIZE:
        raise ValueError(f"signature entity longer than {ENTITY_SIZE} bytes")
    return (INT32.pack(int(hash_type)) + bytes(entity).ljust(ENTITY_SIZE, b"\x00")).ljust(EXTRA_SIZE, b"\x00")


def crypto_message_extra(format_type: int, message_type: int) -> bytes:
    return TWO_INT32.pack(int(format_type), int(message_type)).ljust(EXTRA_SIZE, b"\x00")


def sbom_extra(sbom_format: int) -> bytes:
    return INT32.pack(int(sbom_format)).ljust(EXTRA_SIZE, b"\x00")


def _label(table: dict[Any, str], value: int) -> str:
    return table.get(value, "Unknown")


def _enum_or_int(enum_cls: Any, value: int) -> int:
    try:
        return enum_cls(value)  # type: ignore[no-any-return]
    except ValueError:
        return value


@dataclass(frozen=True, slots=True)
class Descriptor:
    datatype: int = 0
    used: int = 0
    id: int = 0
    group_id: int = 0  # raw, with GROUP_MASK bits
    linked_id: int = 0  # raw: object id, or group id | GROUP_MASK
    offset: int = 0
    size: int = 0
    size_with_padding: int = 0
    created_at: int = 0
    modified_at: int = 0
    uid: int = 0
    gid: int = 0
    name: bytes = bytes(NAME_SIZE)
    extra: bytes = bytes(EXTRA_SIZE)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Descriptor:
        if len(raw) != DESCRIPTOR_SIZE:
            raise ValueError(f"descriptor needs {DESCRIPTOR_SIZE} bytes, got {len(raw)}")
        return cls(*DESCRIPTOR_STRUCT.unpack(raw))

    def pack(self) -> bytes:
        return DESCRIPTOR_STRUCT.pack(
            self.datatype,
            self.used,
            self.id,
            self.group_id,
            self.linked_id,
            self.offset,
            self.size,
            self.size_with_padding,
            self.created_at,
            self.modified_at,
            self.uid,
            self.gid,
            self.name,
            self.extra,
        )

    def replace(self, **changes: Any) -> Descriptor:
        return dataclasses.replace(self, **changes)

    # -- views ----------------------------------------------------------------------
    @property
    def is_used(self) -> bool:
        return self.used != 0

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def group(self) -> int:
        """Group id with the mask bits removed; 0 = no group."""
        return self.group_id & ~GROUP_MASK & 0xFFFFFFFF

    @property
    def link(self) -> int:
        """Linked object or group id (mask removed); 0 = none."""
        return self.linked_id & ~GROUP_MASK & 0xFFFFFFFF

    @property
    def is_group_link(self) -> bool:
        return (self.linked_id & GROUP_MASK) == GROUP_MASK

    @property
    def name_str(self) -> str:
        return self.name.rstrip(b"\x00").decode("utf-8", "replace")

    @property
    def datatype_enum(self) -> DataType | None:
        try:
            return DataType(self.datatype)
        except ValueError:
            return None

    @property
    def datatype_label(self) -> str:
        known = self.datatype_enum
        return known.label if known is not None else "Unknown"

    @property
    def digest(self) -> str | None:
        """`sha256:...` for OCI root index / blob descriptors (None for other types)."""
        if self.datatype not in OCI_DATATYPES:
            return None
        return parse_digest(self.extra)

    # -- typed Extra ------------------------------------------------------------------
    def partition(self) -> tuple[int, int, bytes]:
        """(fs type, partition type, 3-byte arch code) of a Partition descriptor."""
        fs_type, part_type, arch = PARTITION_EXTRA.unpack_from(self.extra)
        return _enum_or_int(FsType, fs_type), _enum_or_int(PartType, part_type), arch

    @property
    def is_primary_partition(self) -> bool:
        return self.datatype == DataType.PARTITION and self.partition()[1] == PartType.PRIMSYS

    def signature(self) -> tuple[int, bytes | None]:
        """(hash type, 20-byte fingerprint or None when absent) of a Signature descriptor."""
        (hash_type,) = INT32.unpack_from(self.extra)
        fingerprint = self.extra[4 : 4 + FINGERPRINT_SIZE]
        return _enum_or_int(HashType, hash_type), (None if fingerprint == bytes(FINGERPRINT_SIZE) else fingerprint)

    def extra_info(self) -> dict[str, Any]:
        """Type-specific metadata decoded into a readable dict ({} for types without any)."""
        kind = self.datatype
        if kind == DataType.PARTITION:
            fs_type, part_type, arch = self.partition()
            return {
                "fs_type": int(fs_type),
                "fs_type_name": _label(FS_TYPE_LABELS, fs_type),
                "part_type": int(part_type),
                "part_type_name": _label(PART_TYPE_LABELS, part_type),
                "arch": arch_name(arch),
            }
        if kind == DataType.SIGNATURE:
            hash_type, fingerprint = self.signature()
            return {
                "hash_type": int(hash_type),
                "hash_type_name": _label(HASH_TYPE_LABELS, hash_type),
                "entity": fingerprint.hex().upper() if fingerprint is not None else None,
            }
        if kind == DataType.CRYPTO_MESSAGE:
            format_type, message_type = TWO_INT32.unpack_from(self.extra)
            return {
                "format_type": format_type,
                "format_type_name": _label(FORMAT_TYPE_LABELS, _enum_or_int(FormatType, format_type)),
                "message_type": message_type,
                "message_type_name": _label(MESSAGE_TYPE_LABELS, _enum_or_int(MessageType, message_type)),
            }
        if kind == DataType.SBOM:
            (sbom_format,) = INT32.unpack_from(self.extra)
            return {
                "format": sbom_format,
                "format_name": SBOM_FORMAT_LABELS.get(_enum_or_int(SbomFormat, sbom_format), "unknown"),  # type: ignore[call-overload]
            }
        if kind in OCI_DATATYPES:
            return {"digest": self.digest}
        return {}


EMPTY_DESCRIPTOR: Final = Descriptor()
