"""overlay create: shape of the result and every refusal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.errors import CapacityError, NotAnOciSif, OverlayStateError, UsageError
from sifoverlay.ocisif import OVERLAY_FINGERPRINT_ANNOTATION, mediatypes, open_image
from sifoverlay.sif.constants import DataType
from tests.conftest import require_tool
from tests.engine.conftest import assert_consistent, sh, sha256_range, used_sif_objects


def test_create_appends_ext3_layer_shaped_like_singularity(base_image: Path, journal_dir: Path) -> None:
    require_tool("mkfs.ext3", "debugfs")
    with open_image(base_image) as before:
        old_layers = [(layer.media_type, layer.digest, layer.size) for layer in before.layers]
        old_config = before.config.json
        old_index = before.root_index.json
        old_objects = {d.digest: (d.offset, d.size) for d in before.sif.used() if d.datatype == DataType.OCI_BLOB}
        layer_digests = {layer.digest for layer in before.layers}
    result = engine.create_overlay(base_image, size_mib=64, sparse=True)
    assert result.action == "created"
    assert result.layer_size == 64 << 20
    assert_consistent(base_image)
    with open_image(base_image) as img:
        assert [(layer.media_type, layer.digest, layer.size) for layer in img.layers[:-1]] == old_layers
        last = img.manifest.json["layers"][-1]
        assert last["mediaType"] == mediatypes.EXT3_LAYER == "application/vnd.sylabs.image.layer.v1.ext3"
        assert last["size"] == 64 << 20
        assert last["digest"] == result.layer_digest == sha256_range(base_image, result.layer_offset, 64 << 20)
        assert OVERLAY_FINGERPRINT_ANNOTATION in last["annotations"]
        assert img.overlay is not None and img.overlay.fingerprint is not None
        assert img.overlay.fingerprint["state"] == 1
        assert img.config.json["rootfs"]["diff_ids"] == old_config["rootfs"]["diff_ids"] + [result.layer_digest]
        assert img.config.json["history"] == old_config["history"] + [{"created": "0001-01-01T00:00:00Z"}]
        # unknown/other config fields kept verbatim, in order
        assert [k for k in img.config.json] == [k for k in old_config]
        assert {k: v for k, v in img.config.json.items() if k not in ("rootfs", "history")} == \
            {k: v for k, v in old_config.items() if k not in ("rootfs", "history")}
        assert img.root_index.json["schemaVersion"] == old_index["schemaVersion"]
        assert img.root_index.digest == result.new_root_digest
        # the layers' SIF objects did not move; the ext3 lies after the old furthest object
        for digest in layer_digests:
            assert (img.blob(digest).offset, img.blob(digest).size) == old_objects[digest]
        assert result.layer_offset >= max(o + s for o, s in old_objects.values())
    offset = result.layer_offset
    listing = sh("debugfs", "-R", "ls -l /", f"{base_image}?offset={offset}").stdout
    modes = {line.split()[-1]: line.split()[1] for line in listing.splitlines() if line.strip()}
    assert modes["upper"] == "40755" and modes["work"] == "40700"
    assert "lost+found" in modes
    assert os.listdir(journal_dir) == []
    assert not [n for n in os.listdir(base_image.parent) if n != base_image.name]


def test_create_not_sparse_allocates_the_region(base_image: Path) -> None:
    require_tool("mkfs.ext3")
    result = engine.create_overlay(base_image, size_mib=64, sparse=False)
    assert os.stat(base_image).st_blocks * 512 >= 64 << 20
    assert_consistent(base_image)
    assert result.layer_size == 64 << 20


def test_create_refuses_an_existing_overlay(overlay_image: Path) -> None:
    before = overlay_image.read_bytes()
    with pytest.raises(OverlayStateError, match="already has an overlay") as info:
        engine.create_overlay(overlay_image)
    assert str(info.value).startswith(str(overlay_image))
    assert overlay_image.read_bytes() == before


def test_create_refuses_too_few_slots(tmp_path: Path, vectors: Path) -> None:
    image = tmp_path / "full.sif"
    shutil.copyfile(vectors / "oci-sif/TestWrite/DockerManifest.golden", image)
    before = image.read_bytes()
    with pytest.raises(CapacityError, match="needs 5 free descriptor slots.*only 0 free") as info:
        engine.create_overlay(image)
    assert (info.value.needed, info.value.free) == (5, 0)
    assert image.read_bytes() == before


def test_create_refuses_signed_images(base_image: Path) -> None:
    from sifoverlay.sif.add import add_object
    from sifoverlay.sif.descriptor import signature_extra
    from sifoverlay.sif.writeout import ObjectInput

    add_object(base_image, ObjectInput(DataType.SIGNATURE, b"-----BEGIN PGP SIGNATURE-----\n", group=0,
                                       link=1, link_is_group=True, extra=signature_extra(1)))
    before = base_image.read_bytes()
    with pytest.raises(OverlayStateError, match="signed"):
        engine.create_overlay(base_image)
    assert base_image.read_bytes() == before


def test_create_refuses_native_sif(tmp_path: Path, vectors: Path) -> None:
    image = tmp_path / "busybox.sif"
    shutil.copyfile(vectors / "singularity/busybox_amd64.sif", image)
    before = image.read_bytes()
    with pytest.raises(NotAnOciSif, match="native SIF"):
        engine.create_overlay(image)
    assert image.read_bytes() == before


def test_create_refuses_small_size_and_leaves_nothing(base_image: Path, journal_dir: Path) -> None:
    before = base_image.read_bytes()
    with pytest.raises(UsageError, match="at least 64 MiB"):
        engine.create_overlay(base_image, size_mib=32)
    assert base_image.read_bytes() == before
    assert sorted(os.listdir(base_image.parent)) == [base_image.name]


def test_created_objects_use_freed_slots_and_keep_one_root_index(base_image: Path) -> None:
    require_tool("mkfs.ext3")
    ids_before = {d[0] for d in used_sif_objects(base_image)}
    engine.create_overlay(base_image, sparse=True)
    objects = used_sif_objects(base_image)
    assert len(objects) == len(ids_before) + 2  # + ext3 + revision history (config/manifest/index replaced)


def test_full_cycle_on_an_imported_busybox_image(tmp_path: Path, vectors: Path) -> None:
    """The project's runnable test image: native busybox SIF -> OCI-SIF (importer) ->
    overlay create -> job writes -> sync -> seal; consistent after every step."""
    require_tool("mkfs.ext3", "debugfs", "fuse2fs", "tar2sqfs")
    from sifoverlay.ocisif.importer import import_image
    from tests.engine.conftest import modify_overlay

    (tmp_path / "img").mkdir()
    image = tmp_path / "img" / "busybox.oci.sif"
    import_image(vectors / "singularity/busybox_amd64.sif", image)
    with open_image(image) as img:
        squashfs_layers = [(layer.media_type, layer.digest) for layer in img.layers]
        assert squashfs_layers and all(t == mediatypes.SQUASHFS_LAYER for t, _ in squashfs_layers)
    engine.create_overlay(image, sparse=True)
    assert_consistent(image)
    modify_overlay(image, tmp_path, b"#!/bin/sh\necho hi\n", name="upper/hello.sh")
    assert engine.sync(image).action == "reconciled"
    assert_consistent(image)
    sealed = engine.seal(image)
    assert_consistent(image)
    with open_image(image) as img:
        assert [(layer.media_type, layer.digest) for layer in img.layers[:-1]] == squashfs_layers
        assert (img.layers[-1].media_type, img.layers[-1].digest) == (mediatypes.SQUASHFS_LAYER, sealed.layer_digest)
        assert img.overlay is None
