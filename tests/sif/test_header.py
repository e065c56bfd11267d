"""Header decode/encode, cross-checked with what the Go siftool printed (TestApp_Header)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay.sif import DETERMINISTIC_TIME, Header, SifFile

from tests.conftest import HAVE_VECTORS

from .support import HEADER_GOLDENS, go_time, parse_key_values, sif_vector_params, vector_id

def go_size(n: int) -> str:
    """siftool's byte formatting: whole units, rounded half up."""
    units = ["B", "KiB", "MiB", "GiB"]
    value, unit = float(n), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{int(value + 0.5)} {units[unit]}"


def expected_fields(h: Header) -> dict[str, str]:
    """What siftool header prints, derived from our decoded header."""
    out: dict[str, str] = {}
    if h.launch_script_str:
        out["Launch Script"] = h.launch_script_str.strip()  # printed with its newline; lines are stripped
    out["Version"] = h.version_str
    if h.arch_name != "unknown":
        out["Primary Architecture"] = h.arch_name
    if h.image_id != bytes(16):
        out["ID"] = str(h.uuid)
    if h.created_at != DETERMINISTIC_TIME:
        out["Created At"] = go_time(h.created_at)
    if h.modified_at != DETERMINISTIC_TIME:
        out["Modified At"] = go_time(h.modified_at)
    out["Descriptors Free"] = str(h.descriptors_free)
    out["Descriptors Total"] = str(h.descriptors_total)
    out["Descriptors Offset"] = str(h.descriptors_offset)
    out["Descriptors Size"] = go_size(h.descriptors_size)
    out["Data Offset"] = str(h.data_offset)
    out["Data Size"] = go_size(h.data_size)
    return out


@pytest.mark.parametrize("golden,image", sorted(HEADER_GOLDENS.items()))
def test_header_matches_siftool_golden(vectors: Path, golden: str, image: str) -> None:
    printed = parse_key_values((vectors / "sif/siftool-golden/TestApp_Header" / f"{golden}.golden").read_text())
    with SifFile.open(vectors / "sif" / image) as sif:
        assert expected_fields(sif.header) == printed


def test_every_header_golden_is_mapped(vectors: Path) -> None:
    names = {p.stem for p in (vectors / "sif/siftool-golden/TestApp_Header").glob("*.golden")}
    newer = {"OneGroupSignedPGP", "OneObjectOCIBlob", "OneObjectOCIRootIndex", "TwoGroupsSignedPGP"}
    assert names == (set(HEADER_GOLDENS) if HAVE_VECTORS else set(HEADER_GOLDENS) - newer)


@pytest.mark.parametrize("path", sif_vector_params(), ids=vector_id)
def test_pack_unpack_identity(path: Path) -> None:
    raw = path.read_bytes()[:128]
    assert Header.unpack(raw).pack() == raw


def test_views_and_determinism(vectors: Path) -> None:
    with SifFile.open(vectors / "sif/one-group-signed-legacy.sif") as sif:
        h = sif.header
    assert h.launch_script_str == "#!/usr/bin/env run-singularity\n"
    assert h.arch_name == "386" and str(h.uuid) == "6ecc76b7-a497-4f7f-9ebd-8da2a04c6be1"
    assert not h.is_deterministic and h.table_end == 4096 + 48 * 585
    empty = Header()
    assert empty.is_deterministic and empty.replace(created_at=0).is_deterministic is False
    with pytest.raises(ValueError, match="128 bytes"):
        Header.unpack(b"x" * 127)
