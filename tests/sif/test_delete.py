"""delete_objects: Go order and options; reproduces oci-tools' TestRemoveBlob golden."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.sif import DataType, ObjectInput, SifFile, add_object, delete_objects, write_new

from .support import mask_times, rows_from_sif, sha256_file, siftool_rows, strip_type

GOLDEN = "oci-sif/TestRemoveBlob/Valid.golden"


def build_remove_blob_base(vectors: Path, out: Path) -> None:
    """The 12-slot OCI-SIF TestRemoveBlob starts from (spec §8 item 4): layer, config,
    manifest, root index written oci-tools style with 8 spare slots. The golden keeps the
    last three objects; the layer (deleted there) is the first blob of TestAppendImage."""
    with SifFile.open(vectors / "oci-sif/TestAppendImage/Default.golden") as appended:
        layer = appended.read(appended.by_id(1))
    with SifFile.open(vectors / GOLDEN) as golden:
        rest = [ObjectInput(d.datatype, golden.read(d)) for d in golden.used()]
    write_new(out, [ObjectInput(DataType.OCI_BLOB, layer), *rest], spare=8)


def test_remove_blob_golden_byte_for_byte(vectors: Path, tmp_path: Path) -> None:
    path = tmp_path / "base.sif"
    build_remove_blob_base(vectors, path)
    with SifFile.open(path) as sif:
        assert (sif.header.descriptors_total, sif.by_id(1).offset, sif.by_id(1).size) == (12, 11116, 3208)
    layout = delete_objects(path, [1], zero=True, compact=True)
    assert path.read_bytes() == (vectors / GOLDEN).read_bytes()
    assert layout.free_slots == 9 and path.stat().st_size == 16853
    assert path.read_bytes()[11116:14324] == bytes(3208)


def test_compact_truncates_only_trailing_space(vectors: Path, tmp_path: Path) -> None:
    path = tmp_path / "base.sif"
    build_remove_blob_base(vectors, path)
    delete_objects(path, [4, 2], zero=False, compact=True)  # root index (last) and config (interior)
    with SifFile.open(path) as sif:
        assert [d.id for d in sif.used()] == [1, 3]
        assert sif.header.data_size == 15809 + 525 - 11116 and sif.header.descriptors_free == 10
    assert path.stat().st_size == 16334
    # not zeroed: the config's bytes are still there
    with SifFile.open(vectors / GOLDEN) as golden:
        config = golden.read(golden.by_id(2))
    assert path.read_bytes()[14324:15809] == config


def test_zero_without_compact_keeps_length(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("sif/one-object-oci-blob.sif")
    layout = delete_objects(path, [1, 1], zero=True)
    raw = path.read_bytes()
    assert len(raw) == 33023 and raw[32176:] == bytes(847)
    assert layout.header.data_size == 847 and layout.free_slots == 48
    with SifFile.open(path) as sif:
        assert sif.used() == []
    # the next object reuses the (now dead) trailing space
    desc = add_object(path, ObjectInput(DataType.GENERIC, b"abc"))
    assert (desc.id, desc.offset) == (1, 32176) and path.stat().st_size == 33023


def test_unknown_id_refused_untouched(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("sif/two-groups.sif")
    before = sha256_file(path)
    with pytest.raises(UsageError, match="no object with id 9"):
        delete_objects(path, [1, 9], zero=True, compact=True)
    assert sha256_file(path) == before


def test_primary_partition_delete_resets_arch(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("sif/two-groups.sif")
    delete_objects(path, [2])
    with SifFile.open(path) as sif:
        assert sif.header.arch == b"00\0" and [d.id for d in sif.used()] == [1, 3]


@pytest.mark.parametrize("vector,object_id", [("sif/two-groups.sif", 1), ("sif/two-groups.sif", 2), ("sif/two-groups.sif", 3), ("sif/one-group-signed-pgp.sif", 3)])
def test_same_bytes_as_go_siftool_del(siftool: str, vectors: Path, tmp_path: Path, vector: str, object_id: int) -> None:
    go, ours = tmp_path / "go.sif", tmp_path / "ours.sif"
    shutil.copyfile(vectors / vector, go)
    shutil.copyfile(vectors / vector, ours)
    subprocess.run([siftool, "del", str(object_id), str(go)], check=True, capture_output=True)
    delete_objects(ours, [object_id])
    assert mask_times(ours.read_bytes()) == mask_times(go.read_bytes())
    assert strip_type(siftool_rows(siftool, ours)) == rows_from_sif(ours)


def test_siftool_lists_after_delete_and_add(siftool: str, vectors: Path, tmp_path: Path) -> None:
    path = tmp_path / "base.sif"
    build_remove_blob_base(vectors, path)
    delete_objects(path, [1, 4], zero=True, compact=True)
    add_object(path, ObjectInput(DataType.OCI_ROOT_INDEX, b'{"schemaVersion":2}'))
    rows = siftool_rows(siftool, path)
    assert strip_type(rows) == rows_from_sif(path)
    assert [(r.id, r.start) for r in rows] == [(1, 16334), (2, 14324), (3, 15809)]


def test_go_mutation_order_through_the_seam(vectors: Path, tmp_path: Path) -> None:
    from sifoverlay.fsio import CountingIO

    path = tmp_path / "base.sif"
    build_remove_blob_base(vectors, path)
    io = CountingIO(keep_log=True)
    delete_objects(path, [1, 4], zero=True, compact=True, io=io)
    ops = [(op, info.get("offset"), info.get("length")) for op, info in io.log]
    assert ops == [
        ("open", None, None),
        ("pwrite", 11116, 3208),  # zero object 1
        ("pwrite", 16334, 519),  # zero object 4
        ("truncate", None, 16334),  # compact: trailing free space only
        ("pwrite", 4096, 12 * 585),  # the descriptor table
        ("pwrite", 0, 128),  # then the header
        ("fsync", None, None),
    ]
