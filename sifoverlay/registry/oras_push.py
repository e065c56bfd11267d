"""`push IMAGE oras://HOST/REPO:TAG`: the OCI-SIF file itself as an ORAS artifact, the
way SingularityCE pushes SIF files (spec §2.3): one layer
`application/vnd.sylabs.sif.layer.v1.sif` titled with the file name, config
`application/vnd.sylabs.sif.config.v1+json` holding `{}`, an OCI manifest. Uploaded with
the `oras` package, chunked (bounded memory for multi-GiB overlays)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time

from sifoverlay.errors import RegistryError, UsageError
from sifoverlay.fsio import REAL_IO, FileIO
from sifoverlay.ocisif import mediatypes as mt

from .client import CHUNK_SIZE, Progress
from .oras_client import OrasRegistry
from .refs import Reference
from .results import PushedLayer, PushResult

log = logging.getLogger(__name__)

SIF_CONFIG_BODY = b"{}"


def push_file(image: str, ref: Reference, *, plain_http: bool = False, progress: Progress | None = None,
              io: FileIO = REAL_IO) -> PushResult:
    start = time.monotonic()
    name = os.path.basename(image)
    if ":" in name:
        raise UsageError(image, "file name contains ':', which the oras package reads as a media type separator")
    registry = OrasRegistry(ref, plain_http=plain_http, progress=progress)
    with tempfile.TemporaryDirectory(prefix="sifoverlay-oras-") as work:
        config = os.path.join(work, "config.json")
        io.write_file_atomic(config, SIF_CONFIG_BODY, durable=False)  # scratch: the `{}` config for oras
        response = registry.push(
            target=registry.target, files=[f"{os.path.abspath(image)}:{mt.SIF_LAYER}"],
            manifest_config=f"{config}:{mt.SIF_CONFIG}", disable_path_validation=True,
            do_chunked=True, chunk_size=CHUNK_SIZE, quiet=True,
        )
    manifest_digest = response.headers.get("Docker-Content-Digest", "")
    if not manifest_digest:
        raise RegistryError(str(ref), "the registry did not return the manifest digest")
    layer = _pushed_layer(registry, image, manifest_digest)
    log.info("pushed %s to %s (oras): manifest %s", image, ref, manifest_digest)
    return PushResult(image, str(ref), "oras", "sif", manifest_digest,
                      "sha256:" + hashlib.sha256(SIF_CONFIG_BODY).hexdigest(), (layer,), time.monotonic() - start)


def _pushed_layer(registry: OrasRegistry, image: str, manifest_digest: str) -> PushedLayer:
    """The layer as the registry now lists it (read back by digest)."""
    manifest = registry.get_manifest(f"{registry.ref.api_host}/{registry.ref.repository}@{manifest_digest}")
    layers = [l for l in manifest.get("layers", []) if l.get("mediaType") == mt.SIF_LAYER]
    if len(layers) != 1:
        raise RegistryError(str(registry.ref), f"pushed manifest {manifest_digest} lists {len(layers)} SIF layers")
    return PushedLayer(mt.SIF_LAYER, layers[0]["digest"], int(layers[0]["size"]), layers[0]["digest"], True, "sif")
