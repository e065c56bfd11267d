"""`pull docker://HOST/REPO:TAG[@sha256:...] OUT.oci.sif`: fetch an image into a private
OCI layout beside OUT (every blob digest-checked while it streams), then build OUT:

* images of squashfs layers (+ an ext3 overlay last), as `push docker://` writes them
  by default: the blobs, config and manifest go into the OCI-SIF unchanged
  (build.write_ocisif), so layer and manifest digests stay what they were - the
  Foundation importer takes no ext3 layer and would rewrite the manifest;
* everything else (tar / tar+gzip layers, mixed): the Foundation importer
  (ocisif.importer.import_image) converts the layers to squashfs.
Either way OUT appears atomically (temp + rename) and the layout is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Final

from sifoverlay.errors import RegistryError, UsageError
from sifoverlay.fsio import REAL_IO, FileIO
from sifoverlay.ocisif import jsonedit, open_image
from sifoverlay.ocisif import mediatypes as mt

from .blobs import ProgressTotal, output_directory, receive
from .client import Progress, RegistryClient
from .refs import Reference
from .results import PullResult

log = logging.getLogger(__name__)

ACCEPT: Final = (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST)
_JSON_LIMIT: Final = 8 << 20


def pull_image(ref: Reference, out: str, *, plain_http: bool = False, platform: str | None = None,
               progress: Progress | None = None, io: FileIO = REAL_IO) -> PullResult:
    start = time.monotonic()
    directory = output_directory(out)
    client = RegistryClient(ref, plain_http=plain_http, actions="pull")
    raw, media_type = _manifest(client, ref.reference, ref.digest)
    if mt.is_index(media_type) or mt.is_index(_json(raw, client).get("mediaType")):
        entry = _pick_platform(_json(raw, client), platform, client)
        raw, media_type = _manifest(client, entry["digest"], entry["digest"])
    manifest = _json(raw, client)
    if not mt.is_image_manifest(media_type or manifest.get("mediaType")):
        raise client.fail(f"not an image manifest ({media_type or manifest.get('mediaType')})")
    layers = manifest.get("layers") if isinstance(manifest.get("layers"), list) else []
    blobs = [manifest.get("config"), *layers]
    if not all(isinstance(b, dict) and jsonedit.is_digest(b.get("digest")) for b in blobs):
        raise client.fail("manifest has a config or layer without a sha256 digest")
    total = sum(int(b.get("size") or 0) for b in blobs)
    staging = tempfile.mkdtemp(prefix=".sifoverlay-pull-", dir=directory)
    try:
        layout = os.path.join(staging, "layout")
        paths = _fetch_layout(client, layout, raw, manifest, blobs, total, progress, io)
        if layers and all(l.get("mediaType") in (mt.SQUASHFS_LAYER, mt.EXT3_LAYER) for l in layers):
            _write_direct(out, raw, paths, manifest, io)
            imported = False
        else:
            from sifoverlay.ocisif.importer import import_image

            import_image(layout, out, io=io)
            imported = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # io-seam: exempt (private scratch layout of this pull)
    with open_image(out) as img:
        digests = tuple(layer.digest for layer in img.layers)
        manifest_digest = img.manifest.digest
        size = os.fstat(img.sif.fd).st_size
    log.info("pulled %s into %s (%d layers)", ref, out, len(digests))
    return PullResult(str(ref), out, "docker", manifest_digest, digests, size, time.monotonic() - start, imported)


def _json(raw: bytes, client: RegistryClient) -> dict[str, Any]:
    try:
        value = jsonedit.parse(raw)  # limits on crafted values: digits, range, depth
    except jsonedit.JsonError:
        raise client.fail("the registry sent a manifest that is not JSON") from None
    if not isinstance(value, dict):
        raise client.fail("the registry sent a manifest that is not a JSON object")
    return value


def _manifest(client: RegistryClient, reference: str, digest: str | None) -> tuple[bytes, str]:
    raw, media_type = client.get_manifest(reference, ACCEPT)
    if len(raw) > _JSON_LIMIT:
        raise client.fail(f"manifest {reference} is larger than {_JSON_LIMIT} bytes")
    actual = jsonedit.digest_of(raw)
    if digest is not None and actual != digest:
        raise client.fail(f"manifest {reference} hashes to {actual}")
    return raw, media_type


def _pick_platform(index: dict[str, Any], platform: str | None, client: RegistryClient) -> dict[str, Any]:
    from sifoverlay.ocisif.layout_dir import Platform

    wanted = Platform.parse(platform) if platform else Platform.host()
    entries = [e for e in index.get("manifests") or []
               if isinstance(e, dict) and mt.is_image_manifest(e.get("mediaType"))]
    for entry in entries:
        found = Platform.from_json(entry.get("platform"))
        if found is None or found.matches(wanted):
            return entry
    raise client.fail(f"no image for platform {wanted} in the index")


def _fetch_layout(client: RegistryClient, layout: str, manifest_raw: bytes, manifest: dict[str, Any],
                  blobs: list[dict[str, Any]], total: int, progress: Progress | None, io: FileIO) -> dict[str, str]:
    """Download every blob into an OCI layout; returns digest -> path."""
    blob_dir = os.path.join(layout, "blobs", "sha256")
    io.makedirs(blob_dir, 0o700)
    paths: dict[str, str] = {}
    tally = ProgressTotal(progress, total)
    for blob in blobs:
        digest = blob["digest"]
        if digest in paths:
            continue
        path = os.path.join(blob_dir, digest.split(":", 1)[1])
        _download(client, digest, int(blob.get("size") or -1), path, tally, io)
        paths[digest] = path
    manifest_digest = jsonedit.digest_of(manifest_raw)
    io.write_file_atomic(os.path.join(blob_dir, manifest_digest.split(":", 1)[1]), manifest_raw, durable=False)
    media_type = manifest.get("mediaType") or mt.OCI_MANIFEST
    index = jsonedit.new_index([jsonedit.make_descriptor(media_type, len(manifest_raw), manifest_digest)])
    io.write_file_atomic(os.path.join(layout, "index.json"), jsonedit.canonical(index), durable=False)
    io.write_file_atomic(os.path.join(layout, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}', durable=False)
    return paths


def _download(client: RegistryClient, digest: str, size: int, path: str, tally: ProgressTotal, io: FileIO) -> None:
    response = client.get_blob(digest)
    fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        actual, written = receive(response, fd, io=io, tally=tally)
    finally:
        io.close(fd)
    if actual != digest or (size >= 0 and written != size):
        raise RegistryError(str(client.ref), f"blob {digest} arrived as {written} bytes hashing to {actual}")


def _write_direct(out: str, manifest_raw: bytes, paths: dict[str, str], manifest: dict[str, Any], io: FileIO) -> None:
    """OCI-SIF with the blobs as they are, in oci-tools order: layers, config, manifest."""
    from sifoverlay.ocisif.build import write_ocisif

    config_raw = _read_small(paths[manifest["config"]["digest"]])
    layer_paths = list(dict.fromkeys(paths[l["digest"]] for l in manifest["layers"]))
    media_type = manifest.get("mediaType") or mt.OCI_MANIFEST
    entry = jsonedit.make_descriptor(media_type, len(manifest_raw), jsonedit.digest_of(manifest_raw))
    index = jsonedit.new_index([entry])
    write_ocisif(out, [*layer_paths, config_raw, manifest_raw], index, io=io)


def _read_small(path: str) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read(_JSON_LIMIT + 1)
    if len(raw) > _JSON_LIMIT:
        raise UsageError(path, f"config is larger than {_JSON_LIMIT} bytes")
    return raw
