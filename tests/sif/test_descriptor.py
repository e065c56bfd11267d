"""Descriptor decode/encode, typed Extra fields, groups and links, cross-checked with
what the Go siftool printed (TestApp_Info, TestApp_List)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay.sif import (
    DETERMINISTIC_TIME,
    DataType,
    Descriptor,
    FsType,
    HashType,
    PartType,
    SifFile,
    crypto_message_extra,
    encode_digest,
    parse_digest,
    partition_extra,
    sbom_extra,
    signature_extra,
)

from .support import HEADER_GOLDENS, go_time, parse_key_values, parse_siftool_list, rows_from_sif, sif_vector_params, strip_type, vector_id

INFO_GOLDENS = {
    "CryptMessage": ("one-object-crypt-message.sif", 1),
    "DataPartitionEXT3": ("two-groups.sif", 3),
    "DataPartitionRaw": ("two-groups.sif", 1),
    "DataPartitionSquashFS": ("two-groups.sif", 2),
    "DataSignature": ("two-groups-signed.sif", 4),  # Debian's golden (the newer one names -pgp)
    "GenericJSON": ("one-object-generic-json.sif", 1),
    "OCIBlob": ("one-object-oci-blob.sif", 1),
    "OCIRootIndex": ("one-object-oci-root-index.sif", 1),
    "SBOM": ("one-object-sbom.sif", 1),
    "Time": ("one-object-time.sif", 1),
}


def info_fields(d: Descriptor) -> dict[str, str]:
    """What `siftool info` prints, derived from our decoded descriptor."""
    out = {
        "Data Type": d.datatype_label,
        "ID": str(d.id),
        "Group ID": str(d.group) if d.group else "NONE",
        "Linked ID": "NONE" if not d.link else f"{d.link} (G)" if d.is_group_link else str(d.link),
        "Offset": str(d.offset),
        "Size": str(d.size),
    }
    if d.created_at != DETERMINISTIC_TIME:
        out["Created At"] = go_time(d.created_at)
    if d.modified_at != DETERMINISTIC_TIME:
        out["Modified At"] = go_time(d.modified_at)
    if d.name_str:
        out["Name"] = d.name_str
    info = d.extra_info()
    if d.datatype == DataType.PARTITION:
        out |= {"Filesystem Type": info["fs_type_name"], "Partition Type": info["part_type_name"], "Architecture": info["arch"]}
    elif d.datatype == DataType.SIGNATURE:
        out["Hash Type"] = info["hash_type_name"]
        if info["entity"]:
            out["Entity"] = info["entity"]
    elif d.datatype == DataType.CRYPTO_MESSAGE:
        out |= {"Format Type": info["format_type_name"], "Message Type": info["message_type_name"]}
    elif d.datatype == DataType.SBOM:
        out["Format"] = info["format_name"]
    elif d.digest is not None:
        out["Digest"] = d.digest
    return out


@pytest.mark.parametrize("golden", sorted(INFO_GOLDENS))
def test_info_matches_siftool_golden(vectors: Path, golden: str) -> None:
    image, object_id = INFO_GOLDENS[golden]
    printed = parse_key_values((vectors / "sif/siftool-golden/TestApp_Info" / f"{golden}.golden").read_text())
    with SifFile.open(vectors / "sif" / image) as sif:
        assert info_fields(sif.by_id(object_id)) == printed


def type_column(d: Descriptor) -> str:
    if d.datatype == DataType.PARTITION:
        i = d.extra_info()
        return f"FS ({i['fs_type_name']}/{i['part_type_name']}/{i['arch']})"
    if d.datatype == DataType.SIGNATURE:
        return f"Signature ({d.extra_info()['hash_type_name']})"
    if d.datatype == DataType.CRYPTO_MESSAGE:
        i = d.extra_info()
        return f"Cryptographic Message ({i['format_type_name']}/{i['message_type_name']})"
    if d.datatype == DataType.SBOM:
        return f"SBOM ({d.extra_info()['format_name']})"
    return d.datatype_label


@pytest.mark.parametrize("golden", sorted(HEADER_GOLDENS))
def test_list_matches_siftool_golden(vectors: Path, golden: str) -> None:
    image = vectors / "sif" / HEADER_GOLDENS[golden]
    rows = parse_siftool_list((vectors / "sif/siftool-golden/TestApp_List" / f"{golden}.golden").read_text())
    assert strip_type(rows) == rows_from_sif(image)
    with SifFile.open(image) as sif:
        assert [r.type for r in rows] == [type_column(d) for d in sif.used()]


def test_group_and_link_encodings(vectors: Path) -> None:
    with SifFile.open(vectors / "sif/one-group-signed-pgp.sif") as sif:
        part, sig = sif.by_id(1), sif.by_id(3)
    assert part.group_id == 0xF0000001 and part.group == 1 and part.linked_id == 0 and part.link == 0
    assert sig.group_id == 0xF0000000 and sig.group == 0
    assert sig.linked_id == 0xF0000001 and sig.link == 1 and sig.is_group_link
    assert sig.pack()[9:17] == bytes.fromhex("000000f0" "010000f0")
    with SifFile.open(vectors / "sif/two-groups-signed-legacy.sif") as sif:
        legacy = sif.by_id(4)
    assert legacy.linked_id == 2 and legacy.link == 2 and not legacy.is_group_link  # object link to id 2


def test_partition_extra_bytes_and_decode() -> None:
    raw = partition_extra(FsType.EXT3, PartType.OVERLAY, b"02\0")
    assert raw[:11] == bytes.fromhex("02000000" "04000000" "303200") and raw[11:] == bytes(373)
    d = Descriptor(datatype=DataType.PARTITION, used=1, id=1, extra=raw)
    assert d.partition() == (FsType.EXT3, PartType.OVERLAY, b"02\0")
    assert d.extra_info() == {"fs_type": 2, "fs_type_name": "Ext3", "part_type": 4, "part_type_name": "Overlay", "arch": "amd64"}
    assert not d.is_primary_partition
    odd = d.replace(extra=partition_extra(9, 9, b"77\0"))
    assert odd.extra_info()["fs_type_name"] == "Unknown" and odd.extra_info()["arch"] == "unknown"


def test_signature_crypto_sbom_extras() -> None:
    fp = bytes(range(1, 21))
    sig = Descriptor(datatype=DataType.SIGNATURE, extra=signature_extra(HashType.SHA384, fp))
    assert sig.signature() == (HashType.SHA384, fp)
    assert sig.extra_info() == {"hash_type": 2, "hash_type_name": "SHA-384", "entity": fp.hex().upper()}
    assert Descriptor(datatype=DataType.SIGNATURE, extra=signature_extra(1)).extra_info()["entity"] is None
    with pytest.raises(ValueError):
        signature_extra(1, bytes(257))
    msg = Descriptor(datatype=DataType.CRYPTO_MESSAGE, extra=crypto_message_extra(2, 0x200))
    assert msg.extra_info() == {"format_type": 2, "format_type_name": "PEM", "message_type": 0x200, "message_type_name": "RSA-OAEP"}
    sbom = Descriptor(datatype=DataType.SBOM, extra=sbom_extra(4))
    assert sbom.extra_info() == {"format": 4, "format_name": "spdx-json"}
    assert Descriptor(datatype=DataType.SBOM, extra=sbom_extra(99)).extra_info()["format_name"] == "unknown"


def test_digest_encoding() -> None:
    digest = "sha256:" + "ab" * 32
    raw = encode_digest(digest)
    assert len(raw) == 384 and raw[:71] == digest.encode() and raw[71:] == bytes(313)
    assert parse_digest(raw) == digest
    blob = Descriptor(datatype=DataType.OCI_BLOB, extra=raw)
    assert blob.digest == digest and blob.extra_info() == {"digest": digest}
    assert Descriptor(datatype=DataType.GENERIC, extra=raw).digest is None  # only OCI types carry one
    for bad in ("sha256:" + "AB" * 32, "sha512:" + "ab" * 64, "sha256:abc", "md5:" + "a" * 32):
        assert parse_digest(bad.encode()) is None
        with pytest.raises(ValueError):
            encode_digest(bad)
    assert parse_digest(b"\xff\xfe") is None


@pytest.mark.parametrize("path", sif_vector_params(), ids=vector_id)
def test_every_descriptor_round_trips(path: Path) -> None:
    raw = path.read_bytes()
    with SifFile.open(path) as sif:
        base = sif.header.descriptors_offset
        for slot, d in enumerate(sif.descriptors):
            chunk = raw[base + slot * 585 : base + (slot + 1) * 585]
            assert Descriptor.unpack(chunk) == d and d.pack() == chunk
            if not d.is_used:
                assert chunk == bytes(585)


def test_views() -> None:
    d = Descriptor(datatype=DataType.GENERIC_JSON, used=1, id=3, offset=100, size=20, name=b"data.json".ljust(128, b"\0"))
    assert d.end == 120 and d.name_str == "data.json" and d.datatype_enum is DataType.GENERIC_JSON
    assert d.datatype_label == "JSON.Generic"
    with pytest.raises(ValueError, match="585 bytes"):
        Descriptor.unpack(bytes(584))
