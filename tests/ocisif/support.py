"""Helpers of the ocisif tests: blobs of a vector, crafted images, file hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sifoverlay.ocisif import jsonedit, mediatypes
from sifoverlay.ocisif.build import write_ocisif
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.load import SifFile

from tests.conftest import VECTORS

# The conformance set ($SIFOVERLAY_VECTORS): a test that reads one of these while it is
# absent is skipped with tests/conftest.py's CONFORMANCE_SKIP reason.
OCI_SIF = VECTORS / "oci-sif"
HELLO = OCI_SIF / "TestWrite" / "DockerManifest.golden"  # one image, one layer, 4 slots
EXT3_IMAGE = VECTORS / "singularity" / "extfs-for-overlay.img"


def sha256_file(path: Path | str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def parts(path: Path | str) -> tuple[list[bytes], bytes, int]:
    """(OCI blob bytes in slot order, root index bytes, free slots) of an OCI-SIF."""
    with SifFile.open(path) as sif:
        used = sif.used()
        blobs = [sif.read(d) for d in used if d.datatype == DataType.OCI_BLOB]
        roots = [sif.read(d) for d in used if d.datatype == DataType.OCI_ROOT_INDEX]
        return blobs, roots[0], sif.header.descriptors_free


def hello_parts() -> dict[str, Any]:
    """The hello-world image of HELLO: layer, config, manifest bytes and the parsed JSON."""
    blobs, root, _ = parts(HELLO)
    layer, config, manifest = blobs
    return {"layer": layer, "config": config, "manifest": manifest, "root": root, "manifest_json": json.loads(manifest)}


def copy_writable(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    return dst


def build_image(
    out: Path,
    layers: list[tuple[str, bytes | Path]],
    *,
    layer_annotations: list[dict[str, str] | None] | None = None,
    extra_entries: list[dict[str, Any]] | None = None,
    extra_blobs: list[bytes] | None = None,
    spare: int = 8,
) -> dict[str, Any]:
    """An OCI-manifest image with the given (mediaType, bytes-or-path) layers, written in
    oci-tools order. Returns the digests/JSON used (for assertions)."""
    descriptors = []
    for i, (media_type, source) in enumerate(layers):
        raw_size = len(source) if isinstance(source, bytes) else source.stat().st_size
        digest = jsonedit.digest_of(source) if isinstance(source, bytes) else "sha256:" + sha256_file(source)
        notes = (layer_annotations or [None] * len(layers))[i]
        descriptors.append(jsonedit.make_descriptor(media_type, raw_size, digest, annotations=notes))
    config = jsonedit.canonical(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]}}
    )
    manifest_json = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": jsonedit.descriptor_of(config, mediatypes.OCI_CONFIG),
        "layers": descriptors,
    }
    manifest = jsonedit.canonical(manifest_json)
    entries = [jsonedit.descriptor_of(manifest, mediatypes.OCI_MANIFEST)] + list(extra_entries or [])
    root = jsonedit.canonical(jsonedit.new_index(entries))
    blobs: list[Any] = [src for _, src in layers] + [config, manifest] + list(extra_blobs or [])
    write_ocisif(out, blobs, root, spare=spare)
    return {"config": config, "manifest": manifest, "manifest_json": manifest_json, "root": root, "layers": descriptors}


# -- broken images, built from the hello-world vector with the sif verbs ----------------------------
ROOT_ID, CONFIG_ID = 4, 2  # slots of hello_with_spare: layer, config, manifest, root index


def hello_with_spare(tmp_path: Path) -> Path:
    """HELLO rebuilt with 4 spare slots (the golden itself has none)."""
    blobs, root, _ = parts(HELLO)
    out = tmp_path / "broken.sif"
    write_ocisif(out, blobs, root, spare=4)
    return out


def replace_root(path: Path, raw: bytes) -> None:
    from sifoverlay.sif.add import add_object
    from sifoverlay.sif.delete import delete_objects
    from sifoverlay.sif.writeout import ObjectInput

    delete_objects(path, [ROOT_ID], zero=True, compact=True)
    add_object(path, ObjectInput(DataType.OCI_ROOT_INDEX, raw))


def broken_root_not_json(tmp_path: Path) -> Path:
    path = hello_with_spare(tmp_path)
    replace_root(path, b"{not json")
    return path


def broken_root_is_manifest(tmp_path: Path) -> Path:
    path = hello_with_spare(tmp_path)
    replace_root(path, hello_parts()["manifest"])
    return path


def broken_manifest_not_json(tmp_path: Path) -> Path:
    from sifoverlay.sif.add import add_object
    from sifoverlay.sif.writeout import ObjectInput

    path = hello_with_spare(tmp_path)
    add_object(path, ObjectInput(DataType.OCI_BLOB, b"this is not a manifest"))
    replace_root(path, jsonedit.canonical(jsonedit.new_index([jsonedit.descriptor_of(b"this is not a manifest", mediatypes.OCI_MANIFEST)])))
    return path


def broken_missing_blob(tmp_path: Path) -> Path:
    from sifoverlay.sif.delete import delete_objects

    path = hello_with_spare(tmp_path)
    delete_objects(path, [CONFIG_ID], zero=True)
    return path


def broken_digest_mismatch(tmp_path: Path) -> Path:
    """The config object's extra claims the real config digest over tampered bytes."""
    from sifoverlay.sif.add import add_object
    from sifoverlay.sif.delete import delete_objects
    from sifoverlay.sif.set import set_oci_digest
    from sifoverlay.sif.writeout import ObjectInput

    path = hello_with_spare(tmp_path)
    config = hello_parts()["config"]
    delete_objects(path, [CONFIG_ID])
    new = add_object(path, ObjectInput(DataType.OCI_BLOB, config.replace(b"arm64", b"amd64")))
    set_oci_digest(path, new.id, jsonedit.digest_of(config))
    return path


def broken_two_root_indexes(tmp_path: Path) -> Path:
    from sifoverlay.sif.add import add_object
    from sifoverlay.sif.writeout import ObjectInput

    path = hello_with_spare(tmp_path)
    add_object(path, ObjectInput(DataType.OCI_ROOT_INDEX, b"{}"))
    return path


def broken_two_images(tmp_path: Path) -> Path:
    return copy_writable(OCI_SIF / "TestAppendImage" / "Default.golden", tmp_path / "broken.sif")


def broken_ext3_not_last(tmp_path: Path) -> Path:
    out = tmp_path / "broken.sif"
    build_image(out, [(mediatypes.EXT3_LAYER, b"e" * 100), (mediatypes.SQUASHFS_LAYER, b"s" * 10)])
    return out


CONFIG_DIGEST = "sha256:46331d942d6350436f64e614d75725f6de3bb5c63e266e236e04389820a234c4"
BROKEN = {
    # name: (builder, error class name, message pattern after "<path>: ")
    "root-not-json": (broken_root_not_json, "OciFormatError", r"root index: not valid JSON \(Expecting property name"),
    "root-is-manifest": (broken_root_is_manifest, "OciFormatError", r"root index has mediaType 'application/vnd\.docker\.distribution\.manifest\.v2\+json', not an image index"),
    "manifest-not-json": (broken_manifest_not_json, "OciFormatError", r"manifest sha256:\w{64}: not valid JSON"),
    "missing-blob": (broken_missing_blob, "OciFormatError", rf"config {CONFIG_DIGEST} is referenced but not stored in the SIF"),
    "digest-mismatch": (broken_digest_mismatch, "OciFormatError", rf"config {CONFIG_DIGEST} does not match its bytes \(they hash to sha256:\w{{64}}\)"),
    "two-root-indexes": (broken_two_root_indexes, "SifFormatError", r"more than one OCI root index \(objects 4, 5\)"),
    "two-images": (broken_two_images, "NotAnOciSif", r"2 images in the root index; SingularityCE needs exactly one"),
    "ext3-not-last": (broken_ext3_not_last, "OciFormatError", r"ext3 overlay layer sha256:\w{64} is layer 0 of 2; it must be the last"),
}
