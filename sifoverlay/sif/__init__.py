"""sifoverlay.sif — the SIF container format: read, validate, plan and write.

Byte-compatible with sylabs/sif (spec: docs/format.md, shared ocisif-format.md §1).
"""

from __future__ import annotations

from . import constants, select
from .add import add_object
from .constants import (
    DEFAULT_CAPACITY,
    DESCRIPTOR_SIZE,
    DETERMINISTIC_TIME,
    GROUP_MASK,
    HEADER_SIZE,
    DataType,
    FormatType,
    FsType,
    HashType,
    MessageType,
    PartType,
    SbomFormat,
)
from .create import write_new
from .delete import delete_objects
from .descriptor import (
    Descriptor,
    crypto_message_extra,
    encode_digest,
    parse_digest,
    partition_extra,
    sbom_extra,
    signature_extra,
)
from .header import Header
from .layout import Layout
from .load import SifFile
from .select import MultipleObjectsFound, ObjectNotFound
from .set import set_metadata, set_oci_digest
from .writeout import ObjectInput

__all__ = [
    "DEFAULT_CAPACITY",
    "DESCRIPTOR_SIZE",
    "DETERMINISTIC_TIME",
    "GROUP_MASK",
    "HEADER_SIZE",
    "DataType",
    "Descriptor",
    "FormatType",
    "FsType",
    "HashType",
    "Header",
    "Layout",
    "MessageType",
    "MultipleObjectsFound",
    "ObjectInput",
    "ObjectNotFound",
    "PartType",
    "SbomFormat",
    "SifFile",
    "add_object",
    "constants",
    "crypto_message_extra",
    "delete_objects",
    "encode_digest",
    "parse_digest",
    "partition_extra",
    "sbom_extra",
    "select",
    "set_metadata",
    "set_oci_digest",
    "signature_extra",
    "write_new",
]
