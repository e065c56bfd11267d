"""add_object: Go placement and bookkeeping; refused adds leave the file as it was;
the Go siftool's own `add` produces the same bytes (times aside)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from sifoverlay.errors import CapacityError, SifFormatError, UsageError
from sifoverlay.sif import (
    DataType,
    FsType,
    ObjectInput,
    PartType,
    SifFile,
    add_object,
    partition_extra,
)

from .support import H_TOTAL, mask_times, put_i64, rows_from_sif, sha256_file, siftool_rows, strip_type


def test_add_oci_blob_into_spare_slot(copy_vector, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("oci-sif/TestWrite/SpareDescriptor.golden")
    original = path.read_bytes()
    blob = tmp_path / "blob"
    blob.write_bytes(b'{"hello":"world"}')
    desc = add_object(path, ObjectInput(DataType.OCI_BLOB, blob))
    assert (desc.id, desc.offset, desc.size) == (5, 12553, 17)
    assert desc.digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    raw = path.read_bytes()
    assert raw[:4096] != original[:4096] and raw[12553:] == blob.read_bytes() and len(raw) == 12570
    with SifFile.open(path) as sif:
        h = sif.header
        assert (h.descriptors_free, h.data_size, h.modified_at) == (0, 12570 - 7021, -62135596800)
        assert sif.by_id(5) == desc
    # everything before the new slot's bytes is as it was
    table = 4096 + 4 * 585
    assert raw[128:table] == original[128:table] and raw[table + 585 : 12553] == original[table + 585 : 12553]


def test_full_image_refused_untouched(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("oci-sif/TestWrite/DockerManifest.golden")
    before = sha256_file(path)
    with pytest.raises(CapacityError) as info:
        add_object(path, ObjectInput(DataType.OCI_BLOB, b"{}"))
    assert str(info.value).startswith(f"{path}: no free descriptor slot")
    assert sha256_file(path) == before


def test_digest_mismatch_refused_untouched(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("oci-sif/TestWrite/SpareDescriptor.golden")
    before = sha256_file(path)
    with pytest.raises(UsageError, match="does not match its bytes"):
        add_object(path, ObjectInput(DataType.OCI_BLOB, b"{}", digest="sha256:" + "1" * 64))
    assert sha256_file(path) == before


def test_second_primary_partition_refused(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("singularity/busybox_amd64.sif")
    before = sha256_file(path)
    extra = partition_extra(FsType.SQUASH, PartType.PRIMSYS, b"04\0")
    with pytest.raises(UsageError, match="already has a primary system partition"):
        add_object(path, ObjectInput(DataType.PARTITION, b"x" * 10, extra=extra))
    assert sha256_file(path) == before


def test_damaged_image_refused_untouched(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("sif/one-group.sif")
    raw = bytearray(path.read_bytes())
    put_i64(raw, H_TOTAL, 47)
    path.write_bytes(raw)
    before = sha256_file(path)
    with pytest.raises(SifFormatError, match="descriptor table size"):
        add_object(path, ObjectInput(DataType.GENERIC, b"x"))
    assert sha256_file(path) == before


@pytest.mark.parametrize(
    "vector,flags,obj",
    [
        (
            "sif/one-group.sif",
            ["--datatype", "4", "--parttype", "4", "--partfs", "2", "--partarch", "2", "--groupid", "1"],
            dict(datatype=DataType.PARTITION, extra=partition_extra(FsType.EXT3, PartType.OVERLAY, b"02\0"), alignment=None),
        ),
        ("sif/two-groups.sif", ["--datatype", "6", "--groupid", "2", "--link", "1"], dict(datatype=DataType.GENERIC_JSON, group=2, link=1)),
        ("sif/empty.sif", ["--datatype", "7", "--groupid", "1", "--alignment", "512"], dict(datatype=DataType.GENERIC, alignment=512)),
    ],
    ids=["overlay-partition", "linked-json", "aligned-generic"],
)
def test_same_bytes_as_go_siftool_add(siftool: str, vectors: Path, tmp_path: Path, vector: str, flags: list[str], obj: dict) -> None:  # type: ignore[type-arg]
    payload = tmp_path / "payload.json"
    payload.write_bytes(b'{"n": 1}\n' * 300)
    go, ours = tmp_path / "go.sif", tmp_path / "ours.sif"
    shutil.copyfile(vectors / vector, go)
    shutil.copyfile(vectors / vector, ours)
    subprocess.run([siftool, "add", *flags, str(go), str(payload)], check=True, capture_output=True)
    add_object(ours, ObjectInput(data=payload, **obj))  # siftool 2.8.3 leaves the name empty
    assert mask_times(ours.read_bytes()) == mask_times(go.read_bytes())
    assert strip_type(siftool_rows(siftool, ours)) == rows_from_sif(ours)


def test_go_mutation_order_through_the_seam(copy_vector) -> None:  # type: ignore[no-untyped-def]
    from sifoverlay.fsio import CountingIO

    path = copy_vector("sif/one-group.sif")
    io = CountingIO(keep_log=True)
    add_object(path, ObjectInput(DataType.GENERIC, b"x" * 10), io=io)
    ops = [(op, info.get("offset"), info.get("length")) for op, info in io.log]
    assert ops == [("open", None, None), ("pwrite", 40960, 10), ("pwrite", 4096, 48 * 585), ("pwrite", 0, 128), ("fsync", None, None)]
