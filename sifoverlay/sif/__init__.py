"""sifoverlay.sif — the SIF container format: read, validate, plan and write.

Byte-compatible with sylabs/sif (spec: docs/format.md, shared ocisif-format.md §1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sifoverlay import lazy_getattr

if TYPE_CHECKING:
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

# Lazy (issue 17, fast CLI): reading a SIF (load, descriptor, constants) must not load the
# writers (add, create, delete, set, writeout: uuid, platform). Each name of __all__ comes
# from its submodule on first use; type checkers see the imports above.
_LAZY = {
    "constants": None, "select": None,
    "add_object": "add", "write_new": "create", "delete_objects": "delete", "Header": "header", "Layout": "layout",
    "SifFile": "load", "MultipleObjectsFound": "select", "ObjectNotFound": "select", "set_metadata": "set",
    "set_oci_digest": "set", "ObjectInput": "writeout",
    **dict.fromkeys(["DEFAULT_CAPACITY", "DESCRIPTOR_SIZE", "DETERMINISTIC_TIME", "GROUP_MASK", "HEADER_SIZE",
                     "DataType", "FormatType", "FsType", "HashType", "MessageType", "PartType", "SbomFormat"],
                    "constants"),
    **dict.fromkeys(["Descriptor", "crypto_message_extra", "encode_digest", "parse_digest", "partition_extra",
                     "sbom_extra", "signature_extra"], "descriptor"),
}


if not TYPE_CHECKING:  # hidden from mypy, which would type every unknown name as Any
    __getattr__ = lazy_getattr(__name__, _LAZY, globals())


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
