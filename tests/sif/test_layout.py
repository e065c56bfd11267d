"""Layout: the pure planner of header + descriptor table (placement as sylabs/sif >= 2.18)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from sifoverlay.errors import CapacityError, UsageError
from sifoverlay.sif import (
    DETERMINISTIC_TIME,
    DataType,
    FsType,
    Layout,
    PartType,
    SifFile,
    partition_extra,
)

from .support import sif_vector_params, vector_id

DIGEST = "sha256:" + "cd" * 32
REMOVE_BLOB = "oci-sif/TestRemoveBlob/Valid.golden"  # slot 0 free, hole at [11116, 14324)


def layout_of(path: Path) -> Layout:
    with SifFile.open(path) as sif:
        return Layout.from_file(sif)


@pytest.mark.parametrize("path", sif_vector_params(), ids=vector_id)
def test_from_file_reproduces_metadata(path: Path) -> None:
    layout = layout_of(path)
    h = layout.header
    assert layout.metadata_bytes() == path.read_bytes()[: h.data_offset]
    assert layout.free_slots == h.descriptors_free
    assert layout.file_length == path.stat().st_size  # every vector ends at DataOffset + DataSize


@pytest.mark.parametrize(
    "vector,kwargs",
    [
        ("sif/empty.sif", {}),
        ("sif/empty-launch-script.sif", {"launch_script": "#!/usr/bin/env run-script\n"}),
        ("sif/empty-id.sif", {"image_id": uuid.UUID("3fa802cc-358b-45e3-bcc0-69dc7a45f9f8").bytes}),
    ],
)
def test_new_reproduces_empty_images(vectors: Path, vector: str, kwargs: dict[str, object]) -> None:
    assert Layout.new(**kwargs).metadata_bytes() == (vectors / vector).read_bytes()  # type: ignore[arg-type]


def test_new_refuses_bad_parameters() -> None:
    with pytest.raises(UsageError, match="shorter than 32"):
        Layout.new(launch_script="x" * 32)
    with pytest.raises(UsageError, match="negative"):
        Layout.new(capacity=-1)
    with pytest.raises(UsageError, match="16 bytes"):
        Layout.new(image_id=b"123")


def test_add_goes_after_furthest_live_object_not_into_holes(vectors: Path) -> None:
    layout = layout_of(vectors / REMOVE_BLOB)
    assert layout.data_end == 16853 and layout.free_slots == 9
    desc = layout.add(DataType.OCI_BLOB, 10, digest=DIGEST)
    # first free slot (0 -> id 1) but the interior hole [11116, 14324) is not reused
    assert (desc.id, desc.offset, desc.size, desc.size_with_padding) == (1, 16853, 10, 10)
    assert desc.group_id == 0xF0000001 and desc.linked_id == 0 and desc.digest == DIGEST
    assert desc.created_at == desc.modified_at == DETERMINISTIC_TIME
    h = layout.header
    assert (h.descriptors_free, h.data_size, layout.file_length) == (8, 16863 - 11116, 16863)


def test_trailing_dead_space_is_reused(vectors: Path) -> None:
    layout = layout_of(vectors / REMOVE_BLOB)
    removed = layout.delete(4)
    assert removed.datatype == DataType.OCI_ROOT_INDEX and layout.data_end == 16334
    assert layout.header.data_size == 5737  # unchanged until compact
    desc = layout.add(DataType.OCI_ROOT_INDEX, 5, digest=DIGEST)
    assert (desc.id, desc.offset) == (1, 16334)
    assert layout.header.data_size == 16339 - 11116


def test_partition_alignment_like_two_groups(vectors: Path) -> None:
    layout = Layout.new()
    one = layout.add(DataType.PARTITION, 4, extra=partition_extra(FsType.RAW, PartType.SYSTEM, b"01\0"), alignment=None)
    two = layout.add(DataType.PARTITION, 4096, extra=partition_extra(FsType.SQUASH, PartType.PRIMSYS, b"01\0"), alignment=None)
    three = layout.add(DataType.PARTITION, 262144, group=2, extra=partition_extra(FsType.EXT3, PartType.SYSTEM, b"02\0"), alignment=None)
    with SifFile.open(vectors / "sif/two-groups.sif") as sif:
        assert [one, two, three] == sif.used()
        assert layout.header == sif.header  # arch "01" copied from the primary partition
    unaligned = layout.add(DataType.GENERIC, 3, alignment=0)
    assert unaligned.offset == three.end and unaligned.size_with_padding == 3
    aligned = layout.add(DataType.GENERIC, 3, alignment=1024)
    assert aligned.offset % 1024 == 0 and aligned.size_with_padding == aligned.offset - unaligned.end + 3
    with pytest.raises(UsageError, match="power of two"):
        layout.add(DataType.GENERIC, 3, alignment=1000)


def test_capacity_error_leaves_layout_unchanged(vectors: Path) -> None:
    layout = layout_of(vectors / "oci-sif/TestWrite/DockerManifest.golden")
    before = layout.metadata_bytes()
    with pytest.raises(CapacityError) as info:
        layout.add(DataType.OCI_BLOB, 1, digest=DIGEST)
    assert info.value.needed == 1 and info.value.free == 0 and "all 4 used" in str(info.value)
    assert layout.metadata_bytes() == before


def test_primary_partition_rules() -> None:
    layout = Layout.new(capacity=4)
    prim = layout.add(DataType.PARTITION, 8, extra=partition_extra(FsType.SQUASH, PartType.PRIMSYS, b"02\0"))
    assert layout.header.arch == b"02\0"
    with pytest.raises(UsageError, match="already has a primary"):
        layout.add(DataType.PARTITION, 8, extra=partition_extra(FsType.SQUASH, PartType.PRIMSYS, b"04\0"))
    layout.delete(prim.id)
    assert layout.header.arch == b"00\0" and layout.free_slots == 4


def test_delete_compact_and_unknown_ids(vectors: Path) -> None:
    layout = layout_of(vectors / "oci-sif/TestWrite/SpareDescriptor.golden")
    last = layout.used()[-1]
    layout.delete(last.id)
    assert layout.file_length == 12553  # DataSize kept
    assert layout.compact() == last.offset
    assert layout.header.descriptors_free == 2
    with pytest.raises(UsageError, match="no object with id 4"):
        layout.delete(4)
    with pytest.raises(UsageError, match="no object with id 99"):
        layout.get(99)


def test_set_oci_digest_and_extra(vectors: Path) -> None:
    layout = layout_of(vectors / "oci-sif/TestWrite/DockerManifest.golden")
    new = layout.set_oci_digest(1, DIGEST)
    assert new.digest == DIGEST and layout.get(1).digest == DIGEST and new.offset == 6436
    with pytest.raises(UsageError, match="not a sha256 digest"):
        layout.set_oci_digest(1, "sha256:XYZ")
    other = Layout.new(capacity=2)
    generic = other.add(DataType.GENERIC, 1)
    with pytest.raises(UsageError, match="not an OCI blob"):
        other.set_oci_digest(generic.id, DIGEST)
    changed = other.set_extra(generic.id, b"hello", now=5)
    assert changed.extra[:6] == b"hello\0" and changed.modified_at == 5 and other.header.modified_at == 5
    with pytest.raises(UsageError, match="limit is 384"):
        other.set_extra(generic.id, bytes(385))


def test_add_argument_checks() -> None:
    layout = Layout.new(capacity=3)
    with pytest.raises(UsageError, match="needs a digest"):
        layout.add(DataType.OCI_BLOB, 1)
    with pytest.raises(UsageError, match="carry no digest"):
        layout.add(DataType.GENERIC, 1, digest=DIGEST)
    with pytest.raises(UsageError, match="negative"):
        layout.add(DataType.GENERIC, -1)
    with pytest.raises(UsageError, match="name is 129 bytes"):
        layout.add(DataType.GENERIC, 1, name="n" * 129)
    assert layout.free_slots == 3


def test_stamps(vectors: Path) -> None:
    deterministic = Layout.new()
    assert deterministic.deterministic and deterministic.stamp() == DETERMINISTIC_TIME
    assert deterministic.stamp(7) == 7
    dated = layout_of(vectors / "sif/one-object-time.sif")
    assert not dated.deterministic
    before = int(time.time())
    desc = dated.add(DataType.GENERIC, 1)
    assert before <= desc.created_at == desc.modified_at == dated.header.modified_at <= int(time.time())
    assert dated.header.created_at == 1593475316  # creation time untouched
    linked = dated.add(DataType.SIGNATURE, 1, group=0, link=1, link_is_group=True)
    assert linked.group_id == 0xF0000000 and linked.linked_id == 0xF0000001 and linked.is_group_link
