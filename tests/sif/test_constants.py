"""Constants match sylabs/sif (spec §1.1-1.4, §8 items 1 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay.sif import constants as c
from sifoverlay.sif.descriptor import DESCRIPTOR_STRUCT
from sifoverlay.sif.header import HEADER_STRUCT


def test_struct_sizes() -> None:
    assert HEADER_STRUCT.size == c.HEADER_SIZE == 128
    assert DESCRIPTOR_STRUCT.size == c.DESCRIPTOR_SIZE == 585


def test_numeric_values() -> None:
    assert [int(t) for t in c.DataType] == list(range(0x4001, 0x400C))
    assert c.DataType.OCI_ROOT_INDEX == 0x400A and c.DataType.OCI_BLOB == 16395
    assert (c.FsType.SQUASH, c.FsType.EXT3, c.FsType.RAW, c.FsType.ENCRYPTED_SQUASHFS) == (1, 2, 4, 5)
    assert (c.PartType.SYSTEM, c.PartType.PRIMSYS, c.PartType.DATA, c.PartType.OVERLAY) == (1, 2, 3, 4)
    assert [int(h) for h in c.HashType] == [1, 2, 3, 4, 5]
    assert (c.MessageType.CLEAR_SIGNATURE, c.MessageType.RSA_OAEP) == (0x100, 0x200)
    assert c.SBOM_FORMAT_LABELS[c.SbomFormat.SYFT_JSON] == "syft-json" and len(c.SbomFormat) == 8
    assert c.DETERMINISTIC_TIME == -62135596800
    assert c.DETERMINISTIC_TIME.to_bytes(8, "little", signed=True) == bytes.fromhex("00096e88f1ffffff")
    assert c.GROUP_MASK == 0xF0000000 and c.DEFAULT_CAPACITY == 48


@pytest.mark.parametrize(
    "name,code",
    [("unknown", b"00\0"), ("386", b"01\0"), ("amd64", b"02\0"), ("arm64", b"04\0"), ("s390x", b"11\0"), ("loong64", b"13\0")],
)
def test_arch_table(name: str, code: bytes) -> None:
    assert c.arch_code(name) == code
    assert c.arch_name(code) == name


def test_arch_unknown_inputs() -> None:
    assert c.arch_name(b"99\0") == "unknown"
    assert c.arch_code("02") == b"02\0"
    with pytest.raises(ValueError, match="unknown architecture"):
        c.arch_code("vax")


def test_empty_sif_header_bytes(vectors: Path) -> None:
    raw = (vectors / "sif/empty.sif").read_bytes()
    assert len(raw) == 32176
    expected = (
        bytes(32)
        + bytes.fromhex("5349465f4d41474943003031003030 00".replace(" ", ""))
        + bytes(16)
        + bytes.fromhex("00096e88f1ffffff") * 2
        + (48).to_bytes(8, "little") * 2
        + (4096).to_bytes(8, "little")
        + (28080).to_bytes(8, "little")
        + (32176).to_bytes(8, "little")
        + bytes(8)
    )
    assert raw[:128] == expected
