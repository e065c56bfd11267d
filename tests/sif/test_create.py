"""write_new: byte-identical with the Go writers, deterministic or dated, atomic."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.fsio import CountingIO, SimulatedCrash
from sifoverlay.sif import (
    DETERMINISTIC_TIME,
    DataType,
    FsType,
    HashType,
    ObjectInput,
    PartType,
    SifFile,
    partition_extra,
    signature_extra,
    write_new,
)
from sifoverlay.sif.constants import OCI_DATATYPES

from tests.conftest import HAVE_VECTORS, conformance_glob, conformance_params, sif_reference_images

from .support import rows_from_sif, siftool_rows, strip_type


def objects_of(sif: SifFile) -> list[ObjectInput]:
    """The objects of an image as write_new inputs (Go's default alignment per type)."""
    return [
        ObjectInput(
            d.datatype,
            sif.read(d),
            group=d.group,
            link=d.link,
            link_is_group=d.is_group_link,
            name=d.name,
            extra=None if d.datatype in OCI_DATATYPES else d.extra,
        )
        for d in sif.used()
    ]


def rebuildable(path: Path) -> bool:
    """Images written by current sylabs/sif in one go: table right before the data and
    every object stamped with the header time (the legacy signed ones are not)."""
    with SifFile.open(path) as sif:
        h = sif.header
        return h.data_offset == h.table_end and all(d.created_at == h.created_at == h.modified_at for d in sif.used())


REBUILDABLE = [p for p in sif_reference_images() + conformance_glob("oci-sif/TestWrite/*.golden") if rebuildable(p)]


def test_rebuildable_inventory() -> None:
    # 23 sylabs/sif images (17 of Debian 12, 6 newer of the conformance set) minus 6
    # legacy-signed ones, plus the 4 TestWrite goldens; 11 of Debian's without the set
    assert len(REBUILDABLE) == (17 + 4 if HAVE_VECTORS else 11)


@pytest.mark.parametrize("source", REBUILDABLE + conformance_params([]), ids=lambda p: p.name)
def test_rewriting_objects_reproduces_image(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out.sif"
    with SifFile.open(source) as sif:
        h = sif.header
        write_new(
            out,
            objects_of(sif),
            capacity=h.descriptors_total,
            image_id=h.image_id,
            now=h.created_at,
            launch_script=h.launch_script,
        )
    assert out.read_bytes() == source.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name != "out.sif"]  # temp file renamed away


@pytest.mark.parametrize("golden,spare", [("DockerManifest", 0), ("SpareDescriptor", 1)])
def test_oci_tools_spare_capacity(vectors: Path, tmp_path: Path, golden: str, spare: int) -> None:
    src = vectors / "oci-sif/TestWrite" / f"{golden}.golden"
    with SifFile.open(src) as sif:
        objects = objects_of(sif)
    out = tmp_path / "x.sif"
    layout = write_new(out, objects, spare=spare)
    assert out.read_bytes() == src.read_bytes()
    assert layout.free_slots == spare


def test_dated_image_and_streamed_object(tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(5 * 1024 * 1024 + 17))  # more than one copy chunk
    out = tmp_path / "dated.sif"
    write_new(
        out,
        [
            ObjectInput(DataType.PARTITION, payload, extra=partition_extra(FsType.SQUASH, PartType.PRIMSYS, b"02\0"), name="rootfs"),
            ObjectInput(DataType.OCI_BLOB, payload),
        ],
        capacity=48,
        deterministic=False,
        launch_script="#!/usr/bin/env run-singularity\n",
    )
    with SifFile.open(out) as sif:
        h = sif.header
        assert not h.is_deterministic and h.image_id != bytes(16) and h.created_at > 1_700_000_000
        assert h.arch_name == "amd64" and h.launch_script_str.startswith("#!")
        part, blob = sif.used()
        assert part.offset == 32768 and part.name_str == "rootfs"
        assert blob.offset == part.end and blob.digest == "sha256:" + hashlib.sha256(payload.read_bytes()).hexdigest()
        assert part.created_at == h.created_at
        assert b"".join(sif.iter_chunks(blob)) == payload.read_bytes()


def test_given_digest_must_match_and_nothing_is_left(tmp_path: Path) -> None:
    out = tmp_path / "bad.sif"
    with pytest.raises(UsageError, match="does not match its bytes"):
        write_new(out, [ObjectInput(DataType.OCI_BLOB, b"abc", digest="sha256:" + "0" * 64)])
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_crash_mid_write(tmp_path: Path) -> None:
    out = tmp_path / "img.sif"
    write_new(out, [ObjectInput(DataType.GENERIC, b"old")])
    before = out.read_bytes()
    io = CountingIO(crash_at=3)
    with pytest.raises(SimulatedCrash):
        write_new(out, [ObjectInput(DataType.GENERIC, b"new"), ObjectInput(DataType.GENERIC, b"x")], io=io)
    assert out.read_bytes() == before  # the rename never happened


def test_capacity_checks(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="capacity 1 is smaller"):
        write_new(tmp_path / "a.sif", [ObjectInput(DataType.GENERIC, b"1")] * 2, capacity=1)
    with pytest.raises(UsageError, match="negative"):
        write_new(tmp_path / "a.sif", [], spare=-1)
    layout = write_new(tmp_path / "empty.sif", [], capacity=0)
    assert layout.header.descriptors_total == 0 and (tmp_path / "empty.sif").stat().st_size == 4096
    with SifFile.open(tmp_path / "empty.sif") as sif:
        assert sif.used() == [] and sif.header.created_at == DETERMINISTIC_TIME


def test_siftool_lists_what_we_wrote(siftool: str, tmp_path: Path) -> None:
    out = tmp_path / "mixed.sif"
    write_new(
        out,
        [
            ObjectInput(DataType.PARTITION, bytes(5000), extra=partition_extra(FsType.SQUASH, PartType.PRIMSYS, b"02\0")),
            ObjectInput(DataType.PARTITION, bytes(3000), group=2, extra=partition_extra(FsType.EXT3, PartType.OVERLAY, b"02\0")),
            # siftool aborts its listing on a signature without a known hash type
            ObjectInput(DataType.SIGNATURE, b"sig", group=0, link=1, link_is_group=True, extra=signature_extra(HashType.SHA256, bytes(range(20)))),
            ObjectInput(DataType.SIGNATURE, b"sig2", group=0, link=2, extra=signature_extra(HashType.SHA512)),
            ObjectInput(DataType.OCI_BLOB, b"{}"),
            ObjectInput(DataType.GENERIC_JSON, b"[]", name="x.json"),
        ],
        capacity=10,
    )
    rows = siftool_rows(siftool, out)
    assert strip_type(rows) == rows_from_sif(out)
    assert [r.type for r in rows][:4] == [
        "FS (Squashfs/*System/amd64)",
        "FS (Ext3/Overlay/amd64)",
        "Signature (SHA-256)",
        "Signature (SHA-512)",
    ]
    assert (rows[2].link, rows[2].link_is_group, rows[3].link, rows[3].link_is_group) == (1, True, 2, False)
