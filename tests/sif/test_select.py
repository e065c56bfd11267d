"""select: lookups by id, type, group, link and OCI digest; uniqueness errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay.errors import SifFormatError
from sifoverlay.sif import DataType, Layout, PartType, SifFile
from sifoverlay.sif import select as sel
from sifoverlay.sif.select import MultipleObjectsFound, ObjectNotFound


def test_oci_lookups(vectors: Path) -> None:
    with SifFile.open(vectors / "oci-sif/TestAppendImage/Default.golden") as sif:
        root = sel.root_index(sif)
        assert (root.id, root.offset, root.size) == (7, 17303, 605)
        blob = sif.by_id(2)
        assert sel.by_oci_digest(sif, blob.digest) == blob  # type: ignore[arg-type]
        assert sel.by_oci_digest(sif.descriptors, root.digest) == root  # type: ignore[arg-type]
        assert [d.id for d in sel.all_of_type(sif, DataType.OCI_BLOB)] == [1, 2, 3, 4, 5, 6]
        with pytest.raises(ObjectNotFound) as info:
            sel.by_oci_digest(sif, "sha256:" + "0" * 64)
        assert str(info.value) == f"{sif.path}: no object with OCI digest sha256:{'0' * 64}"
        assert isinstance(info.value, SifFormatError)


def test_missing_and_duplicate(vectors: Path) -> None:
    with SifFile.open(vectors / "sif/two-groups.sif") as sif:
        with pytest.raises(ObjectNotFound, match="no object with data type OCI.RootIndex"):
            sel.root_index(sif)
        with pytest.raises(MultipleObjectsFound, match=r"more than one object with data type FS \(objects 1, 2, 3\)"):
            sel.one_of_type(sif, DataType.PARTITION)
        assert sel.primary_partition(sif).id == 2
        assert [d.id for d in sel.partitions(sif, PartType.SYSTEM)] == [1, 3]
        assert [d.id for d in sel.in_group(sif, 2)] == [3] and sel.groups(sif) == [1, 2]
        assert sel.by_id(sif, 3).size == 262144
        with pytest.raises(ObjectNotFound, match="no object with id 4"):
            sel.by_id(sif, 4)


def test_duplicate_digests_are_an_error() -> None:
    digest = "sha256:" + "ab" * 32
    layout = Layout.new(capacity=3, path="/x.sif")
    layout.add(DataType.OCI_BLOB, 0, digest=digest)
    layout.add(DataType.OCI_BLOB, 0, digest=digest)
    assert sel.duplicate_digests(layout.descriptors) == {digest: [1, 2]}
    with pytest.raises(MultipleObjectsFound) as info:
        sel.by_oci_digest(layout, digest)
    assert str(info.value) == f"/x.sif: more than one object with OCI digest {digest} (objects 1, 2)"


def test_links(vectors: Path) -> None:
    with SifFile.open(vectors / "sif/two-groups-signed-pgp.sif") as sif:
        assert [d.id for d in sel.linked_to(sif, 1, group=True)] == [4]
        assert [d.id for d in sel.linked_to(sif, 2, group=True)] == [5]
        assert sel.linked_to(sif, 1) == [] and sel.in_group(sif, 0) == [sif.by_id(4), sif.by_id(5)]
    with SifFile.open(vectors / "sif/two-groups-signed-legacy.sif") as sif:
        assert [d.id for d in sel.linked_to(sif, 2)] == [4]
