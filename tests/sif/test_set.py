"""set_oci_digest / set_metadata: one descriptor's Extra + times, nothing else."""

from __future__ import annotations

import pytest

from sifoverlay.errors import SifFormatError, UsageError
from sifoverlay.sif import DETERMINISTIC_TIME, SifFile, set_metadata, set_oci_digest
from sifoverlay.sif import select as sel

from .support import sha256_file

NEW = "sha256:" + "0123456789abcdef" * 4


def test_set_oci_digest_changes_only_that_extra(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("oci-sif/TestUpdate/AddLayer.golden")
    original = path.read_bytes()
    desc = set_oci_digest(path, 3, NEW)
    assert desc.digest == NEW and desc.modified_at == DETERMINISTIC_TIME
    raw = path.read_bytes()
    extra_at = 4096 + 2 * 585 + 201
    changed = [i for i in range(len(raw)) if raw[i] != original[i]]
    assert changed and all(extra_at <= i < extra_at + 71 for i in changed)  # deterministic: times stay
    with SifFile.open(path) as sif:
        assert sel.by_oci_digest(sif, NEW).id == 3
    # setting it back restores the original bytes exactly
    set_oci_digest(path, 3, (original[extra_at : extra_at + 71]).decode())
    assert path.read_bytes() == original


def test_dated_image_gets_new_times(copy_vector) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector("singularity/empty.oci.sif")
    desc = set_oci_digest(path, 1, NEW, now=1_800_000_000)
    with SifFile.open(path) as sif:
        assert sif.header.modified_at == desc.modified_at == 1_800_000_000
        assert sif.header.created_at == desc.created_at == 1689330683


def test_set_metadata_on_partition(copy_vector) -> None:  # type: ignore[no-untyped-def]
    from sifoverlay.sif import FsType, PartType, partition_extra

    path = copy_vector("sif/two-groups.sif")
    set_metadata(path, 3, partition_extra(FsType.EXT3, PartType.OVERLAY, b"02\0"))
    with SifFile.open(path) as sif:
        assert sif.by_id(3).extra_info()["part_type_name"] == "Overlay"


@pytest.mark.parametrize(
    "vector,object_id,digest,error,message",
    [
        ("oci-sif/TestUpdate/AddLayer.golden", 9, NEW, UsageError, "no object with id 9"),
        ("oci-sif/TestUpdate/AddLayer.golden", 1, "sha256:nothex", UsageError, "not a sha256 digest"),
        ("sif/two-groups.sif", 1, NEW, UsageError, "is FS, not an OCI blob"),
        ("singularity/extfs-for-overlay.img", 1, NEW, SifFormatError, "bad magic"),
    ],
)
def test_refused_untouched(copy_vector, vector, object_id, digest, error, message) -> None:  # type: ignore[no-untyped-def]
    path = copy_vector(vector)
    before = sha256_file(path)
    with pytest.raises(error, match=message) as info:
        set_oci_digest(path, object_id, digest)
    assert str(info.value).startswith(f"{path}: ")
    assert sha256_file(path) == before
