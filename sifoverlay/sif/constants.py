"""SIF on-disk constants, with sylabs/sif's exact numeric values (spec §1.1-1.4)."""

from __future__ import annotations

import enum
from typing import Final

HEADER_SIZE: Final = 128
DESCRIPTOR_SIZE: Final = 585
NAME_SIZE: Final = 128
EXTRA_SIZE: Final = 384
ENTITY_SIZE: Final = 256
LAUNCH_SCRIPT_SIZE: Final = 32

MAGIC: Final = b"SIF_MAGIC\x00"
VERSION: Final = b"01\x00"
DEFAULT_LAUNCH_SCRIPT: Final = b"#!/usr/bin/env run-singularity\n"

DEFAULT_DESCRIPTORS_OFFSET: Final = 4096
DEFAULT_CAPACITY: Final = 48
DEFAULT_GROUP: Final = 1
DEFAULT_PARTITION_ALIGNMENT: Final = 4096

# Go's zero time.Time (0001-01-01T00:00:00Z) as Unix seconds: what deterministic images store.
DETERMINISTIC_TIME: Final = -62135596800

# Group ids (and group links) are stored OR-ed with this mask.
GROUP_MASK: Final = 0xF0000000

# Sanity ceiling when loading: Go would happily allocate any count the header claims.
# 65536 slots is a 38 MiB table, far beyond anything real (default capacity is 48).
MAX_DESCRIPTORS: Final = 1 << 16


class DataType(enum.IntEnum):
    DEFFILE = 0x4001
    ENVVAR = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B

    @property
    def label(self) -> str:
        """The name siftool prints for this type."""
        return _DATATYPE_LABELS[self]


_DATATYPE_LABELS: Final = {
    DataType.DEFFILE: "Def.FILE",
    DataType.ENVVAR: "Env.Vars",
    DataType.LABELS: "JSON.Labels",
    DataType.PARTITION: "FS",
    DataType.SIGNATURE: "Signature",
    DataType.GENERIC_JSON: "JSON.Generic",
    DataType.GENERIC: "Generic/Raw",
    DataType.CRYPTO_MESSAGE: "Cryptographic Message",
    DataType.SBOM: "SBOM",
    DataType.OCI_ROOT_INDEX: "OCI.RootIndex",
    DataType.OCI_BLOB: "OCI.Blob",
}

OCI_DATATYPES: Final = frozenset({DataType.OCI_ROOT_INDEX, DataType.OCI_BLOB})


class FsType(enum.IntEnum):
    SQUASH = 1
    EXT3 = 2
    IMMUOBJ = 3
    RAW = 4
    ENCRYPTED_SQUASHFS = 5
    GOCRYPTFS_SQUASHFS = 6  # apptainer/sif only


FS_TYPE_LABELS: Final = {
    FsType.SQUASH: "Squashfs",
    FsType.EXT3: "Ext3",
    FsType.IMMUOBJ: "Archive",
    FsType.RAW: "Raw",
    FsType.ENCRYPTED_SQUASHFS: "Encrypted squashfs",
    FsType.GOCRYPTFS_SQUASHFS: "Gocryptfs squashfs",
}


class PartType(enum.IntEnum):
    SYSTEM = 1
    PRIMSYS = 2
    DATA = 3
    OVERLAY = 4


PART_TYPE_LABELS: Final = {
    PartType.SYSTEM: "System",
    PartType.PRIMSYS: "*System",
    PartType.DATA: "Data",
    PartType.OVERLAY: "Overlay",
}


class HashType(enum.IntEnum):
    SHA256 = 1
    SHA384 = 2
    SHA512 = 3
    BLAKE2S = 4
    BLAKE2B = 5


HASH_TYPE_LABELS: Final = {
    HashType.SHA256: "SHA-256",
    HashType.SHA384: "SHA-384",
    HashType.SHA512: "SHA-512",
    HashType.BLAKE2S: "BLAKE2s",
    HashType.BLAKE2B: "BLAKE2b",
}


class FormatType(enum.IntEnum):
    """Crypto message format."""

    OPENPGP = 1
    PEM = 2


class MessageType(enum.IntEnum):
    """Crypto message type."""

    CLEAR_SIGNATURE = 0x100
    RSA_OAEP = 0x200


FORMAT_TYPE_LABELS: Final = {FormatType.OPENPGP: "OpenPGP", FormatType.PEM: "PEM"}
MESSAGE_TYPE_LABELS: Final = {MessageType.CLEAR_SIGNATURE: "Clear Signature", MessageType.RSA_OAEP: "RSA-OAEP"}


class SbomFormat(enum.IntEnum):
    CYCLONEDX_JSON = 1
    CYCLONEDX_XML = 2
    GITHUB_JSON = 3
    SPDX_JSON = 4
    SPDX_RDF = 5
    SPDX_TAG_VALUE = 6
    SPDX_YAML = 7
    SYFT_JSON = 8


SBOM_FORMAT_LABELS: Final = {
    SbomFormat.CYCLONEDX_JSON: "cyclonedx-json",
    SbomFormat.CYCLONEDX_XML: "cyclonedx-xml",
    SbomFormat.GITHUB_JSON: "github-json",
    SbomFormat.SPDX_JSON: "spdx-json",
    SbomFormat.SPDX_RDF: "spdx-rdf",
    SbomFormat.SPDX_TAG_VALUE: "spdx-tag-value",
    SbomFormat.SPDX_YAML: "spdx-yaml",
    SbomFormat.SYFT_JSON: "syft-json",
}

# Arch: 2 ASCII digits + NUL on disk <-> Go's GOARCH names.
ARCH_UNKNOWN: Final = b"00\x00"
ARCH_CODES: Final = {
    "unknown": b"00\x00",
    "386": b"01\x00",
    "amd64": b"02\x00",
    "arm": b"03\x00",
    "arm64": b"04\x00",
    "ppc64": b"05\x00",
    "ppc64le": b"06\x00",
    "mips": b"07\x00",
    "mipsle": b"08\x00",
    "mips64": b"09\x00",
    "mips64le": b"10\x00",
    "s390x": b"11\x00",
    "riscv64": b"12\x00",
    "loong64": b"13\x00",
}
ARCH_NAMES: Final = {code: name for name, code in ARCH_CODES.items()}


def arch_name(code: bytes) -> str:
    """GOARCH name of a 3-byte arch code; 'unknown' for anything not in the table."""
    return ARCH_NAMES.get(bytes(code), "unknown")


def arch_code(name: str) -> bytes:
    """3-byte arch code for a GOARCH name (also accepts the 2-digit code itself)."""
    if name in ARCH_CODES:
        return ARCH_CODES[name]
    if len(name) == 2 and name.isdigit() and (name.encode() + b"\x00") in ARCH_NAMES:
        return name.encode() + b"\x00"
    raise ValueError(f"unknown architecture {name!r}")
