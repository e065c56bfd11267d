"""docker:// push (layers as stored) and pull, against the real registry, checked with
skopeo and by hashing the blobs fetched back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import requests

from sifoverlay import engine
from sifoverlay.ocisif import open_image
from sifoverlay.registry import pull, push
from tests.conftest import require_tool

from .conftest import Registry, run_cli, sh

pytestmark = pytest.mark.registry


def overlay_bytes_digest(image: Path) -> str:
    with open_image(image) as img:
        assert img.overlay is not None
        offset, size = img.overlay.offset, img.overlay.size
    h = hashlib.sha256()
    with open(image, "rb") as f:
        f.seek(offset)
        h.update(f.read(size))
    return "sha256:" + h.hexdigest()


def drift(image: Path, tmp: Path) -> None:
    """Write into the overlay with debugfs, behind the engine's back."""
    require_tool("debugfs")
    with open_image(image) as img:
        assert img.overlay is not None
        offset = img.overlay.offset
    payload = tmp / "payload"
    payload.write_bytes(b"written behind the engine's back\n")
    sh("debugfs", "-w", "-R", f"write {payload} upper/drifted", f"{image}?offset={offset}")


def test_drifted_image_is_reconciled_before_push(tmp_path: Path, registry: Registry, small_image: Path) -> None:
    stale = overlay_bytes_digest(small_image)
    drift(small_image, tmp_path)
    assert engine.status(small_image).state in ("modified", "drift")
    ref = f"{registry.host}/docker/drift:v1"
    proc = run_cli("push", str(small_image), f"docker://{ref}", "--plain-http", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    fresh = overlay_bytes_digest(small_image)
    assert fresh != stale
    assert result["sync"]["action"] == "reconciled" and result["sync"]["new_digest"] == fresh
    assert engine.status(small_image).state == "clean"
    # the registry's manifest is the image's own manifest, and every blob verifies
    raw = sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout.encode()
    with open_image(small_image) as img:
        assert raw == img.manifest.raw
        assert result["manifest"] == img.manifest.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    manifest = json.loads(raw)
    assert manifest["layers"][-1]["mediaType"] == "application/vnd.sylabs.image.layer.v1.ext3"
    assert manifest["layers"][-1]["digest"] == fresh
    for blob in [manifest["config"], *manifest["layers"]]:
        data = requests.get(registry.url(f"/v2/docker/drift/blobs/{blob['digest']}"), timeout=60).content
        assert ("sha256:" + hashlib.sha256(data).hexdigest(), len(data)) == (blob["digest"], blob["size"])


def test_push_then_pull_gives_the_same_image(tmp_path: Path, registry: Registry, small_image: Path) -> None:
    ref = f"docker://{registry.host}/docker/roundtrip:v1"
    pushed = push(small_image, ref, plain_http=True)
    again = push(small_image, ref.replace(":v1", ":v2"), plain_http=True)
    assert [l.uploaded for l in again.layers] == [False, False]  # HEAD found every blob
    assert again.manifest_digest == pushed.manifest_digest
    out = tmp_path / "pulled.oci.sif"
    proc = run_cli("pull", ref, str(out), "--plain-http", "--json")
    assert proc.returncode == 0, proc.stderr
    with open_image(small_image) as mine, open_image(out) as theirs:
        assert [l.digest for l in theirs.layers] == [l.digest for l in mine.layers]
        assert [l.media_type for l in theirs.layers] == [l.media_type for l in mine.layers]
        assert theirs.manifest.digest == mine.manifest.digest == pushed.manifest_digest
        assert theirs.overlay is not None and theirs.overlay.recorded_digest == mine.overlay.recorded_digest
        theirs.verify_layers(include_overlay=True)
    assert engine.status(out).state == "clean"  # the fingerprint annotation came along
    by_digest = pull(f"docker://{registry.host}/docker/roundtrip@{pushed.manifest_digest}",
                     tmp_path / "by-digest.oci.sif", plain_http=True)
    assert by_digest.layer_digests == tuple(l.digest for l in pushed.layers)


def tar_gzip_layout(layout: Path) -> None:
    """An ordinary OCI layout with one tar+gzip layer (built by hand: umoci 0.4.7 `insert`
    writes tars without padding or end blocks, which GNU tar refuses as well)."""
    import gzip
    import io
    import tarfile

    from sifoverlay.ocisif import jsonedit

    raw_tar = io.BytesIO()
    with tarfile.open(fileobj=raw_tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("etc/", None), ("etc/os-release", b"ID=test\n")):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.mode, info.size = (0o755 if data is None else 0o644), len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data else None)
    layer = gzip.compress(raw_tar.getvalue(), mtime=0)
    config = jsonedit.canonical({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": [jsonedit.digest_of(raw_tar.getvalue())]}})
    manifest = jsonedit.canonical({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": jsonedit.descriptor_of(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [jsonedit.descriptor_of(layer, "application/vnd.oci.image.layer.v1.tar+gzip")]})
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in (layer, config, manifest):
        (blobs / jsonedit.digest_of(data).split(":")[1]).write_bytes(data)
    entry = jsonedit.descriptor_of(manifest, "application/vnd.oci.image.manifest.v1+json",
                                   annotations={"org.opencontainers.image.ref.name": "t"})
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def test_pull_of_a_tar_image_goes_through_the_importer(tmp_path: Path, registry: Registry) -> None:
    """An ordinary OCI image (tar+gzip layer, pushed by skopeo) becomes an OCI-SIF."""
    require_tool("skopeo", "unsquashfs")
    layout = tmp_path / "layout"
    tar_gzip_layout(layout)
    sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:t",
       f"docker://{registry.host}/docker/plain:t")
    result = pull(f"docker://{registry.host}/docker/plain:t", tmp_path / "plain.oci.sif", plain_http=True)
    assert result.imported
    with open_image(tmp_path / "plain.oci.sif") as img:
        assert [l.media_type for l in img.layers] == ["application/vnd.sylabs.image.layer.v1.squashfs"]
        assert img.overlay is None
        offset = img.layers[0].offset
    listing = sh("unsquashfs", "-o", str(offset), "-lc", str(tmp_path / "plain.oci.sif")).stdout
    assert "squashfs-root/etc/os-release" in listing


def test_image_without_overlay_is_pushed_without_sync(tmp_path: Path, registry: Registry) -> None:
    from .conftest import build_ocisif, squashfs_from

    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("no overlay here\n")
    image = build_ocisif([squashfs_from(tree, tmp_path / "l.sqfs")], tmp_path / "plain.oci.sif", overlay_mib=None)
    result = push(image, f"docker://{registry.host}/docker/nooverlay:v1", plain_http=True)
    assert result.sync is None
    with open_image(image) as img:
        assert result.manifest_digest == img.manifest.digest
        assert [l.digest for l in result.layers] == [l.digest for l in img.layers]


def test_busy_drifted_image_is_not_pushed(tmp_path: Path, registry: Registry, small_image: Path) -> None:
    """A job holds the lease and the overlay drifted: sync refuses (ImageBusy), so does push."""
    from sifoverlay.engine import lease

    drift(small_image, tmp_path)
    held = lease.acquire(small_image, lease.Holder.current("4242", "slurm"))
    try:
        proc = run_cli("push", str(small_image), f"docker://{registry.host}/docker/busy:v1", "--plain-http")
    finally:
        held.release()
    assert proc.returncode == 75
    assert proc.stderr.count("\n") == 1 and "4242" in proc.stderr
    missing = requests.get(registry.url("/v2/docker/busy/manifests/v1"), timeout=10)
    assert missing.status_code == 404
