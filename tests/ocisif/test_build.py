"""build: oci-tools' Write and UpdateRootIndex reproduced byte for byte (spec §8.3-8.4)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from sifoverlay.errors import CapacityError, OciFormatError
from sifoverlay.fsio import CountingIO, SimulatedCrash
from sifoverlay.ocisif import jsonedit, mediatypes, open_image
from sifoverlay.ocisif.build import update_root_index, write_ocisif
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.load import SifFile

from tests.conftest import conformance_glob, conformance_params

from .support import HELLO, OCI_SIF, build_image, hello_parts, parts, sha256_file

WRITE_GOLDENS = conformance_params(conformance_glob("oci-sif/TestWrite/*.golden"))
UPDATE_GOLDENS = ["TestUpdate/AddLayer", "TestAppendImage/Default", "TestAppendImage/WithReference"]


@pytest.mark.parametrize("golden", WRITE_GOLDENS, ids=lambda p: p.stem)
def test_write_reproduces_oci_tools_golden(golden: Path, tmp_path: Path) -> None:
    blobs, root, free = parts(golden)
    out = tmp_path / "out.sif"
    write_ocisif(out, blobs, root, spare=free)
    assert sha256_file(out) == sha256_file(golden)


def test_write_streams_path_sources_identically(tmp_path: Path) -> None:
    blobs, root, free = parts(OCI_SIF / "TestWrite" / "ManyLayers.golden")
    sources = []
    for i, blob in enumerate(blobs):
        src = tmp_path / f"blob{i}"
        src.write_bytes(blob)
        sources.append(src if i % 2 else str(src))
    out = tmp_path / "out.sif"
    write_ocisif(out, sources, root, spare=free)
    assert sha256_file(out) == sha256_file(OCI_SIF / "TestWrite" / "ManyLayers.golden")


def test_default_capacity_is_objects_plus_eight_spare(tmp_path: Path) -> None:
    hello = hello_parts()
    out = tmp_path / "hello.sif"
    layout = write_ocisif(out, [hello["layer"], hello["config"], hello["manifest"]], hello["root"])
    with SifFile.open(out) as sif:
        h = sif.header
        assert (h.descriptors_total, h.descriptors_free, h.data_offset) == (12, 8, 11116)
        assert [(d.id, d.datatype, d.offset, d.size) for d in sif.used()] == [
            (1, DataType.OCI_BLOB, 11116, 3208),
            (2, DataType.OCI_BLOB, 14324, 1485),
            (3, DataType.OCI_BLOB, 15809, 525),
            (4, DataType.OCI_ROOT_INDEX, 16334, 314),
        ]
        assert h.is_deterministic and sif.stat.st_size == 16648
    assert layout.header == h


def test_large_layer_is_streamed_not_loaded(tmp_path: Path) -> None:
    size = 24 << 20
    layer = tmp_path / "layer.squashfs"
    with open(layer, "wb") as handle:  # sparse: cheap to create
        handle.truncate(size)
    out = tmp_path / "big.sif"
    tracemalloc.start()
    try:
        build_image(out, [(mediatypes.SQUASHFS_LAYER, layer)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 2
    with open_image(out) as image:
        assert image.layers[0].size == size
        image.verify_layers()


def test_tuple_items_choose_the_datatype(tmp_path: Path) -> None:
    out = tmp_path / "t.sif"
    write_ocisif(out, [(b"generic bytes", DataType.GENERIC), (b"blob", None)], b"{}", spare=0)
    with SifFile.open(out) as sif:
        assert [d.datatype for d in sif.used()] == [DataType.GENERIC, DataType.OCI_BLOB, DataType.OCI_ROOT_INDEX]
        assert sif.used()[1].digest == jsonedit.digest_of(b"blob")


def test_write_goes_through_the_io_seam_via_a_temp_file(tmp_path: Path) -> None:
    hello = hello_parts()
    out = tmp_path / "seam.sif"
    io = CountingIO(keep_log=True)
    write_ocisif(out, [hello["layer"], hello["config"], hello["manifest"]], hello["root"], io=io)
    ops = [op for op, _ in io.log]
    assert ops[0] == "open" and io.log[0][1]["path"] != str(out)
    assert ops[-2:] == ["rename", "fsync_dir"] and io.log[-2][1]["dst"] == str(out)
    assert ops.count("pwrite") >= 6 and "fsync" in ops
    plain = tmp_path / "plain.sif"
    write_ocisif(plain, [hello["layer"], hello["config"], hello["manifest"]], hello["root"])
    assert sha256_file(out) == sha256_file(plain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.sif", "seam.sif"]  # no temp file left


def test_interrupted_write_leaves_no_image(tmp_path: Path) -> None:
    hello = hello_parts()
    out = tmp_path / "crash.sif"
    with pytest.raises(SimulatedCrash):
        write_ocisif(out, [hello["layer"], hello["config"], hello["manifest"]], hello["root"], io=CountingIO(crash_at=3))
    assert not out.exists()


def test_bad_root_index_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "no.sif"
    with pytest.raises(OciFormatError, match="new root index: not valid JSON"):
        write_ocisif(out, [b"x"], b"{")
    with pytest.raises(OciFormatError, match="new root index is an image manifest"):
        write_ocisif(out, [b"x"], {"config": {}, "layers": []})
    assert list(tmp_path.iterdir()) == []


# -- the generic update algorithm --------------------------------------------------------------------
def hello_base(tmp_path: Path) -> Path:
    """The 12-slot hello-world image the oci-tools update tests start from."""
    blobs, root, _ = parts(HELLO)
    base = tmp_path / "base.sif"
    write_ocisif(base, blobs, root, spare=8)
    return base


@pytest.mark.parametrize("name", UPDATE_GOLDENS)
def test_update_root_index_reproduces_golden(name: str, tmp_path: Path) -> None:
    golden = OCI_SIF / f"{name}.golden"
    base = hello_base(tmp_path)
    blobs, root, _ = parts(golden)
    assert update_root_index(base, root, {jsonedit.digest_of(b): b for b in blobs}) is True
    assert sha256_file(base) == sha256_file(golden)


def test_update_with_identical_index_writes_nothing(tmp_path: Path) -> None:
    base = hello_base(tmp_path)
    before = (sha256_file(base), os.stat(base).st_mtime_ns)
    io = CountingIO(keep_log=True)
    assert update_root_index(base, parts(HELLO)[1], {}, io=io) is False
    assert io.log == [] and (sha256_file(base), os.stat(base).st_mtime_ns) == before


def test_update_replacing_the_image_drops_old_blobs(tmp_path: Path) -> None:
    """ReplaceImage(img, nil) as overlay sync does: config/manifest/index rewritten, the
    big layer kept in place."""
    base = hello_base(tmp_path)
    hello = hello_parts()
    config = jsonedit.canonical(jsonedit.append_history(jsonedit.parse(hello["config"]), {"comment": "x"}))
    manifest = jsonedit.canonical(jsonedit.replace_config(hello["manifest_json"], {"size": len(config), "digest": jsonedit.digest_of(config)}))
    index = jsonedit.new_index([jsonedit.descriptor_of(manifest, mediatypes.DOCKER_MANIFEST)])
    assert update_root_index(base, index, {jsonedit.digest_of(config): config, jsonedit.digest_of(manifest): manifest})
    with SifFile.open(base) as sif:
        assert [(d.id, d.offset, d.size) for d in sif.used()] == [
            (1, 11116, 3208),
            (2, 14324, len(config)),
            (3, 14324 + len(config), len(manifest)),
            (4, 14324 + len(config) + len(manifest), len(jsonedit.canonical(index))),
        ]
        assert sif.stat.st_size == sif.used()[-1].end
    with open_image(base) as image:
        assert image.config.raw == config and image.layers[0].offset == 11116


def test_update_refusals_leave_the_file_untouched(tmp_path: Path) -> None:
    base = hello_base(tmp_path)
    before = sha256_file(base)
    blobs, root, _ = parts(OCI_SIF / "TestUpdate" / "AddLayer.golden")
    given = {jsonedit.digest_of(b): b for b in blobs}
    manifest_digest = jsonedit.parse(root)["manifests"][0]["digest"]
    with pytest.raises(OciFormatError, match=f"manifest {manifest_digest} is referenced by the new root index but neither stored nor given"):
        update_root_index(base, root, {})
    partial = {d: b for d, b in given.items() if d != "sha256:0bd82013a7933b5855bff067c804a6b0413e7badd401333850188f0a8a338130"}
    with pytest.raises(OciFormatError, match="1 blob\\(s\\) needed by the new root index are not given: sha256:0bd82013"):
        update_root_index(base, root, partial)
    with pytest.raises(OciFormatError, match="new root index has mediaType"):
        update_root_index(base, blobs[3], given)
    assert sha256_file(base) == before
    tight = tmp_path / "tight.sif"
    write_ocisif(tight, parts(HELLO)[0], parts(HELLO)[1], spare=0)
    before = sha256_file(tight)
    with pytest.raises(CapacityError, match="needs 4 free descriptor slots, would have 3") as err:
        update_root_index(tight, root, given)
    assert (err.value.needed, err.value.free) == (4, 3)
    assert sha256_file(tight) == before


def test_update_refuses_a_wrong_layer_source_before_writing(tmp_path: Path) -> None:
    base = hello_base(tmp_path)
    before = sha256_file(base)
    blobs, root, _ = parts(OCI_SIF / "TestUpdate" / "AddLayer.golden")
    given: dict[str, object] = {jsonedit.digest_of(b): b for b in blobs}
    wrong = tmp_path / "layer.tar.gz"
    wrong.write_bytes(b"not the layer")
    given["sha256:0bd82013a7933b5855bff067c804a6b0413e7badd401333850188f0a8a338130"] = wrong
    with pytest.raises(OciFormatError, match=f"layer sha256:0bd82013\\w+ given as {wrong} has 13 bytes hashing to sha256:"):
        update_root_index(base, root, given)  # type: ignore[arg-type]
    assert sha256_file(base) == before
    right = tmp_path / "right.tar.gz"
    right.write_bytes(blobs[1])
    given["sha256:0bd82013a7933b5855bff067c804a6b0413e7badd401333850188f0a8a338130"] = right
    assert update_root_index(base, root, given)  # type: ignore[arg-type]
    assert sha256_file(base) == sha256_file(OCI_SIF / "TestUpdate" / "AddLayer.golden")
