"""open_image: validation of the whole OCI graph, SingularityCE's image selection, layers
and the overlay. Broken images are built from valid vectors with the sif verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sifoverlay.errors import NotAnOciSif, OciFormatError, SifFormatError
from sifoverlay.ocisif import OVERLAY_FINGERPRINT_ANNOTATION, jsonedit, mediatypes, model, open_image
from sifoverlay.ocisif.model import select_image_entries
from sifoverlay.sif.add import add_object
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.delete import delete_objects
from sifoverlay.sif.load import SifFile
from sifoverlay.sif.set import set_oci_digest
from sifoverlay.sif.writeout import ObjectInput

from .support import BROKEN, EXT3_IMAGE, ROOT_ID, HELLO, OCI_SIF, build_image, copy_writable, hello_parts, parts, replace_root, sha256_file

SINGLE_IMAGE = ["TestWrite/DockerManifest", "TestWrite/SpareDescriptor", "TestWrite/ManyLayers", "TestUpdate/AddLayer"]
MULTI_IMAGE = {"TestWrite/DockerManifestList": 9, "TestAppendImage/Default": 2, "TestAppendImage/WithReference": 2}


@pytest.mark.parametrize("name", SINGLE_IMAGE)
def test_single_image_goldens_open_and_match_the_sif(name: str) -> None:
    path = OCI_SIF / f"{name}.golden"
    blobs, root, _ = parts(path)
    manifest = json.loads(next(b for b in blobs if jsonedit.digest_of(b) == json.loads(root)["manifests"][0]["digest"]))
    with open_image(path) as image:
        assert image.root_index.raw == root and image.root_index.digest == jsonedit.digest_of(root)
        assert image.manifest.json == manifest and image.manifest.digest == jsonedit.digest_of(image.manifest.raw)
        assert image.config.digest == manifest["config"]["digest"] == jsonedit.digest_of(image.config.raw)
        assert image.manifest_entry == json.loads(root)["manifests"][0]
        assert [(l.media_type, l.digest, l.size) for l in image.layers] == [
            (d["mediaType"], d["digest"], d["size"]) for d in manifest["layers"]
        ]
        for layer in image.layers:
            assert layer.descriptor.digest == layer.digest and layer.descriptor.size == layer.size
            assert image.blob(layer.digest) == layer.descriptor
        assert image.overlay is None
        image.verify_layers()
        assert image.read_blob(image.config.digest) == image.config.raw
    assert image.sif.fd == -1  # opened from a path: closed with the image


def test_layer_offsets_of_add_layer_golden() -> None:
    with open_image(OCI_SIF / "TestUpdate" / "AddLayer.golden") as image:
        assert [(l.offset, l.size) for l in image.layers] == [(11116, 3208), (14324, 223)]
        assert (image.config.descriptor.id, image.manifest.descriptor.id, image.root_index.descriptor.id) == (3, 4, 5)


@pytest.mark.parametrize("name, count", sorted(MULTI_IMAGE.items()))
def test_multi_image_goldens_need_an_explicit_choice(name: str, count: int) -> None:
    path = OCI_SIF / f"{name}.golden"
    with pytest.raises(NotAnOciSif, match=f"{count} images in the root index; SingularityCE needs exactly one") as err:
        open_image(path)
    assert str(err.value).startswith(f"{path}: ")
    _, root, _ = parts(path)
    for entry in json.loads(root)["manifests"]:
        with open_image(path, manifest_digest=entry["digest"]) as image:
            assert image.manifest.digest == entry["digest"]
            assert image.layers and all(l.descriptor.size == l.size for l in image.layers)
            image.verify_layers()


def test_empty_root_index_is_not_an_image(vectors: Path) -> None:
    path = vectors / "singularity" / "empty.oci.sif"
    with pytest.raises(NotAnOciSif, match="no image: the root index lists no image manifest"):
        open_image(path)
    with SifFile.open(path) as sif:
        assert model.read_root_index(sif).json == {}
        assert list(model.iter_refs(sif)) == []


def test_native_sif_is_not_an_oci_sif(vectors: Path) -> None:
    with pytest.raises(NotAnOciSif, match="not an OCI-SIF: no OCI root index object"):
        open_image(vectors / "singularity" / "busybox_amd64.sif")


def test_removed_blob_golden_is_refused() -> None:
    path = OCI_SIF / "TestRemoveBlob" / "Valid.golden"
    with pytest.raises(OciFormatError, match="layer sha256:7050e35b49f5e348.* is referenced but not stored in the SIF"):
        open_image(path)


def test_open_on_a_sif_file_leaves_it_open() -> None:
    with SifFile.open(HELLO) as sif:
        with open_image(sif) as image:
            assert image.sif is sif
        assert sif.fd >= 0


# -- selection as pure functions --------------------------------------------------------------
def entry(media_type: str, n: int, ref: str | None = None) -> dict:
    e = jsonedit.make_descriptor(media_type, n, "sha256:" + f"{n:x}" * 64)
    if ref is not None:
        e["annotations"] = {"org.opencontainers.image.ref.name": ref}
    return e


def test_selection_rules() -> None:
    image = entry(mediatypes.OCI_MANIFEST, 1)
    docker = entry(mediatypes.DOCKER_MANIFEST, 2, "myimage:v1")
    nested = entry(mediatypes.OCI_INDEX, 3)
    cosign = entry(mediatypes.OCI_MANIFEST, 4, "_cosign:sha256-abc.sig")
    blob = entry("application/octet-stream", 5)
    assert select_image_entries({"manifests": [nested, image, cosign, blob]}) == [image]
    assert select_image_entries({"manifests": [docker, cosign]}) == [docker]
    assert select_image_entries({"manifests": [image, docker]}) == [image, docker]
    assert select_image_entries({"manifests": [nested, cosign, blob]}) == []
    assert select_image_entries({}) == []
    not_cosign = entry(mediatypes.OCI_MANIFEST, 6, "x_cosign")
    assert select_image_entries({"manifests": [not_cosign]}) == [not_cosign]


def test_cosign_entry_is_skipped_in_a_real_file(tmp_path: Path) -> None:
    hello = hello_parts()
    sig_layer = b'{"critical":{}}'
    sig_config = b"{}"
    sig_manifest = jsonedit.canonical({
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": jsonedit.descriptor_of(sig_config, mediatypes.OCI_CONFIG),
        "layers": [jsonedit.descriptor_of(sig_layer, "application/vnd.dev.cosign.simplesigning.v1+json")],
    })
    cosign_entry = jsonedit.descriptor_of(sig_manifest, mediatypes.OCI_MANIFEST, annotations={"org.opencontainers.image.ref.name": "_cosign:sha256-x.sig"})
    out = tmp_path / "cosign.sif"
    image_entry = jsonedit.parse(hello["root"])["manifests"][0]
    from sifoverlay.ocisif.build import write_ocisif

    write_ocisif(out, [hello["layer"], hello["config"], hello["manifest"], sig_layer, sig_config, sig_manifest], jsonedit.new_index([image_entry, cosign_entry]))
    with open_image(out) as image:
        assert image.manifest.digest == image_entry["digest"]
        assert [l.digest for l in image.layers] == [jsonedit.digest_of(hello["layer"])]


def test_nested_index_is_read_but_not_selected(tmp_path: Path) -> None:
    hello = hello_parts()
    image_entry = jsonedit.parse(hello["root"])["manifests"][0]
    child = jsonedit.canonical(jsonedit.new_index([image_entry]))
    out = tmp_path / "nested.sif"
    from sifoverlay.ocisif.build import write_ocisif

    write_ocisif(out, [hello["layer"], hello["config"], hello["manifest"], child], jsonedit.new_index([jsonedit.descriptor_of(child, mediatypes.OCI_INDEX)]))
    with SifFile.open(out) as sif:
        kinds = [(r.kind, r.digest) for r in model.iter_refs(sif)]
    assert kinds == [
        ("layer", jsonedit.digest_of(hello["layer"])),
        ("config", jsonedit.digest_of(hello["config"])),
        ("manifest", jsonedit.digest_of(hello["manifest"])),
        ("index", jsonedit.digest_of(child)),
    ]
    with pytest.raises(NotAnOciSif, match="no image"):
        open_image(out)


# -- the overlay ------------------------------------------------------------------------------
def test_last_ext3_layer_is_the_overlay(tmp_path: Path) -> None:
    fingerprint = {"mnt_count": 3, "state": 1}
    out = tmp_path / "overlay.sif"
    built = build_image(
        out,
        [(mediatypes.SQUASHFS_LAYER, b"squash" * 10), (mediatypes.EXT3_LAYER, EXT3_IMAGE)],
        layer_annotations=[None, {OVERLAY_FINGERPRINT_ANNOTATION: json.dumps(fingerprint)}],
    )
    with open_image(out) as image:
        overlay = image.overlay
        assert overlay is not None
        assert overlay.descriptor == image.layers[-1].descriptor
        assert overlay.offset == image.layers[0].offset + 60  # unaligned, right after layer 0
        assert overlay.size == EXT3_IMAGE.stat().st_size
        assert overlay.recorded_digest == "sha256:" + sha256_file(EXT3_IMAGE) == built["layers"][1]["digest"]
        assert overlay.fingerprint == fingerprint
        image.verify_layers(include_overlay=True)


def test_overlay_without_or_with_bad_fingerprint(tmp_path: Path) -> None:
    for notes, expected in [(None, None), ({OVERLAY_FINGERPRINT_ANNOTATION: "{broken"}, None), ({OVERLAY_FINGERPRINT_ANNOTATION: "[1]"}, None)]:
        out = tmp_path / "o.sif"
        build_image(out, [(mediatypes.SQUASHFS_LAYER, b"s"), (mediatypes.EXT3_LAYER, b"e" * 100)], layer_annotations=[None, notes])
        with open_image(out) as image:
            assert image.overlay is not None and image.overlay.fingerprint is expected


def test_stale_overlay_digest_is_caught_only_by_verify(tmp_path: Path) -> None:
    out = tmp_path / "stale.sif"
    build_image(out, [(mediatypes.SQUASHFS_LAYER, b"s" * 10), (mediatypes.EXT3_LAYER, b"e" * 100)])
    with open_image(out) as image:
        offset = image.overlay.offset
    with open(out, "r+b") as handle:  # what a writable run does to the ext3 bytes
        handle.seek(offset + 50)
        handle.write(b"X")
    with open_image(out) as image:  # open never hashes layers
        image.verify_layers()  # overlay skipped by default
        with pytest.raises(OciFormatError, match="layer 1 sha256:.* does not match its bytes"):
            image.verify_layers(include_overlay=True)


def hello_copy(tmp_path: Path) -> Path:
    return copy_writable(HELLO, tmp_path / "hello.sif")


@pytest.fixture
def hello_copy(tmp_path: Path) -> Path:
    return copy_writable(HELLO, tmp_path / "hello.sif")


def add_spare(path: Path, tmp_path: Path) -> Path:
    """The hello image rebuilt with spare slots (the golden has none)."""
    from sifoverlay.ocisif.build import write_ocisif

    blobs, root, _ = parts(path)
    out = tmp_path / "spare.sif"
    write_ocisif(out, blobs, root, spare=4)
    return out


def expect(path: Path, error: type[Exception], pattern: str) -> None:
    before = sha256_file(path)
    with pytest.raises(error, match=pattern) as err:
        open_image(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert sha256_file(path) == before


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_images_are_refused_with_one_line(case: str, tmp_path: Path) -> None:
    builder, error_name, pattern = BROKEN[case]
    path = builder(tmp_path)
    expect(path, {"OciFormatError": OciFormatError, "NotAnOciSif": NotAnOciSif, "SifFormatError": SifFormatError}[error_name], pattern)


def test_root_index_shapes(tmp_path: Path) -> None:
    path = add_spare(HELLO, tmp_path)
    replace_root(path, jsonedit.canonical({"config": {}, "layers": []}))
    expect(path, OciFormatError, "root index is an image manifest, not an index")
    replace_root(path, b"[]")
    expect(path, OciFormatError, "root index is not a JSON object")
    replace_root(path, b'{"schemaVersion":1}')
    expect(path, OciFormatError, "root index has schemaVersion 1, expected 2")
    replace_root(path, b'{"manifests":{}}')
    expect(path, OciFormatError, "root index manifests is not a list")


def test_root_index_entry_without_size(tmp_path: Path) -> None:
    path = add_spare(HELLO, tmp_path)
    entry_ = jsonedit.parse(hello_parts()["root"])["manifests"][0]
    del entry_["size"]
    replace_root(path, jsonedit.canonical(jsonedit.new_index([entry_])))
    expect(path, OciFormatError, "root index entry 0 has no valid size")


def test_root_index_bytes_do_not_match_its_extra(hello_copy: Path) -> None:
    set_oci_digest(hello_copy, ROOT_ID, "sha256:" + "0" * 64)
    expect(hello_copy, OciFormatError, "root index sha256:0{64} does not match its bytes")


def test_manifest_size_mismatch(tmp_path: Path) -> None:
    path = add_spare(HELLO, tmp_path)
    entry_ = jsonedit.parse(hello_parts()["root"])["manifests"][0]
    replace_root(path, jsonedit.canonical(jsonedit.new_index([dict(entry_, size=entry_["size"] + 1)])))
    expect(path, OciFormatError, f"manifest {entry_['digest']} is referenced with size 526 but its SIF object 3 holds 525 bytes")


def test_layer_size_mismatch(tmp_path: Path) -> None:
    out = tmp_path / "sz.sif"
    built = build_image(out, [(mediatypes.SQUASHFS_LAYER, b"s" * 10)])
    manifest = jsonedit.replace_layer(built["manifest_json"], 0, {"size": 11})
    raw = jsonedit.canonical(manifest)
    add_object(out, ObjectInput(DataType.OCI_BLOB, raw))
    delete_objects(out, [4])  # the root index (slots: layer, config, manifest, root)
    add_object(out, ObjectInput(DataType.OCI_ROOT_INDEX, jsonedit.canonical(jsonedit.new_index([jsonedit.descriptor_of(raw, mediatypes.OCI_MANIFEST)]))))
    expect(out, OciFormatError, "layer sha256:\\w+ is referenced with size 11 but its SIF object 1 holds 10 bytes")


def test_same_blob_stored_twice(tmp_path: Path) -> None:
    path = add_spare(HELLO, tmp_path)
    add_object(path, ObjectInput(DataType.OCI_BLOB, hello_parts()["layer"]))
    expect(path, OciFormatError, r"layer sha256:7050e35b\w+ is stored twice \(objects 1, 5\)")
