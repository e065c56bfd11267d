"""`push IMAGE docker://HOST/REPO:TAG`: push the OCI image inside an OCI-SIF.

* `squashfs` (default, what SingularityCE pushes): every layer - squashfs layers and the
  ext3 overlay - is uploaded byte for byte from its place in the SIF, then the stored
  config and manifest, unchanged (same manifest digest as in the file).
* `tar`: every squashfs layer and the overlay's `upper/` become gzip OCI tar layers
  (tarlayers); the config gets the new `rootfs.diff_ids` (and a history entry for the
  overlay layer) and the manifest the new layer descriptors, so any OCI runtime can run
  the image with the overlay's changes.

Blobs the registry already holds are skipped (HEAD). The registry verifies each
digest, so bytes that change during the push make it fail instead of publishing a
stale digest. The local image is only read.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from sifoverlay.errors import OciFormatError
from sifoverlay.ocisif import OciSifImage, jsonedit
from sifoverlay.ocisif import mediatypes as mt

from .blobs import ProgressTotal, upload_range
from .client import Progress, RegistryClient
from .refs import Reference
from .results import PushedLayer, PushResult

log = logging.getLogger(__name__)

def push_image(img: OciSifImage, ref: Reference, *, layer_format: str = "squashfs", plain_http: bool = False,
               progress: Progress | None = None, client: RegistryClient | None = None) -> PushResult:
    start = time.monotonic()
    client = client or RegistryClient(ref, plain_http=plain_http, actions="pull,push")
    client.ping()  # unreachable / unauthorised registries fail here, before any work
    if layer_format == "tar":
        layers, config_raw, manifest_raw, manifest_type = _tar_layers(img, client, progress)
    else:
        layers, config_raw, manifest_raw, manifest_type = _as_stored(img, client, progress)
    config_digest = client.upload_bytes(config_raw)
    manifest_digest = client.put_manifest(manifest_raw, manifest_type, ref.tag)
    log.info("pushed %s to %s: manifest %s", img.path, ref, manifest_digest)
    return PushResult(img.path, str(ref), "docker", layer_format, manifest_digest, config_digest,
                      tuple(layers), time.monotonic() - start)


def _manifest_type(img: OciSifImage) -> str:
    media_type = img.manifest.json.get("mediaType") or img.manifest_entry.get("mediaType") or mt.OCI_MANIFEST
    return str(media_type)


def _as_stored(img: OciSifImage, client: RegistryClient,
               progress: Progress | None) -> tuple[list[PushedLayer], bytes, bytes, str]:
    tally = ProgressTotal(progress, sum(layer.size for layer in img.layers))
    pushed = []
    for layer in img.layers:
        blob = upload_range(client, img.sif.fd, layer.offset, layer.size, layer.digest, tally)
        source = "overlay" if layer.media_type == mt.EXT3_LAYER else "squashfs"
        pushed.append(PushedLayer(layer.media_type, blob.digest, blob.size, layer.digest, blob.uploaded, source))
    return pushed, img.config.raw, img.manifest.raw, _manifest_type(img)


def _tar_layers(img: OciSifImage, client: RegistryClient,
                progress: Progress | None) -> tuple[list[PushedLayer], bytes, bytes, str]:
    from . import tarlayers  # FUSE helpers: only needed here

    manifest_type = _manifest_type(img)
    layer_type = mt.DOCKER_LAYER_TAR_GZIP if manifest_type == mt.DOCKER_MANIFEST else mt.OCI_LAYER_TAR_GZIP
    tally = ProgressTotal(progress, 0)  # compressed sizes are unknown until the end
    pushed: list[PushedLayer] = []
    for number, layer in enumerate(img.layers):
        if layer.media_type == mt.EXT3_LAYER:
            converted = tarlayers.stream_overlay_upper(client, img.path, img.sif.fd, layer.offset, tally)
            source = "overlay"
        elif layer.media_type == mt.SQUASHFS_LAYER:
            converted = tarlayers.stream_squashfs_layer(client, img.path, img.sif.fd, layer.offset, layer.size, tally)
            source = "squashfs"
        else:
            raise OciFormatError(img.path, f"layer {number} has media type {layer.media_type}: "
                                           "only squashfs and ext3 layers can be converted to tar")
        pushed.append(PushedLayer(layer_type, converted.blob.digest, converted.blob.size, converted.diff_id,
                                  True, source))
    config = _tar_config(img, pushed)
    config_raw = jsonedit.canonical(config)
    manifest: dict[str, Any] = copy.deepcopy(img.manifest.json)
    manifest["config"] = jsonedit.merge_descriptor(
        manifest["config"], {"size": len(config_raw), "digest": jsonedit.digest_of(config_raw)})
    manifest["layers"] = [jsonedit.make_descriptor(l.media_type, l.size, l.digest) for l in pushed]
    return pushed, config_raw, jsonedit.canonical(manifest), manifest_type


def _tar_config(img: OciSifImage, pushed: list[PushedLayer]) -> dict[str, Any]:
    config: dict[str, Any] = copy.deepcopy(img.config.json)
    rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else {}
    config["rootfs"] = dict(rootfs, type="layers", diff_ids=[l.diff_id for l in pushed])
    history = config.get("history")
    if isinstance(history, list) and any(l.source == "overlay" for l in pushed):
        # One non-empty history entry per layer: the overlay layer gets its own.
        real = [h for h in history if isinstance(h, dict) and not h.get("empty_layer")]
        if len(real) == len(pushed) - 1:
            history.append({"created_by": "sifoverlay push --layer-format tar",
                            "comment": "changes recorded in the ext3 overlay (upper/)"})
    return config
