"""`pull oras://HOST/REPO:TAG OUT`: fetch the SIF layer of an ORAS artifact into OUT.

The blob is streamed into a temp file beside OUT through the io seam, hashed on the
way, compared with the manifest's digest and size, fsynced, then renamed over OUT (and
the directory fsynced): OUT is either the old file or the complete, verified new one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Final

from sifoverlay.errors import RegistryError
from sifoverlay.fsio import REAL_IO, FileIO
from sifoverlay.ocisif import jsonedit
from sifoverlay.ocisif import mediatypes as mt

from .blobs import ProgressTotal, output_directory, receive
from .client import Progress
from .oras_client import OrasRegistry
from .refs import Reference
from .results import PullResult

log = logging.getLogger(__name__)

LEGACY_SIF_LAYER: Final = "appliciation/vnd.sylabs.sif.layer.tar"  # sic: old SingularityCE pushes


def pull_file(ref: Reference, out: str, *, plain_http: bool = False, progress: Progress | None = None,
              io: FileIO = REAL_IO) -> PullResult:
    start = time.monotonic()
    directory = output_directory(out)
    registry = OrasRegistry(ref, plain_http=plain_http)
    container = f"{ref.api_host}/{ref.repository}:{ref.tag}"
    manifest_raw, manifest = _manifest(registry, container, ref)
    layer = _sif_layer(manifest, ref)
    digest, size = layer["digest"], int(layer["size"])
    response = registry.get_blob(container, digest, stream=True)
    if response.status_code != 200:
        raise RegistryError(str(ref), f"GET blob {digest} answered {response.status_code}")
    tmp = os.path.join(directory, f".{os.path.basename(out)}.pull.{os.getpid()}")
    fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        actual, done = receive(response, fd, io=io, tally=ProgressTotal(progress, size))
        if actual != digest or done != size:
            raise RegistryError(str(ref), f"downloaded blob has {done} bytes hashing to {actual}, "
                                          f"the manifest says {size} bytes {digest}; nothing written")
        io.fsync(fd)
        io.close(fd)
        fd = -1
        io.rename(tmp, out)
    except BaseException:
        if fd >= 0:
            io.close(fd)
        try:
            io.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    io.fsync_dir(directory)
    manifest_digest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
    log.info("pulled %s (%s) into %s", ref, digest, out)
    return PullResult(str(ref), out, "oras", manifest_digest, (digest,), size, time.monotonic() - start)


def _sif_layer(manifest: dict[str, Any], ref: Reference) -> dict[str, Any]:
    layers = [l for l in manifest.get("layers") or [] if isinstance(l, dict)
              and l.get("mediaType") in (mt.SIF_LAYER, LEGACY_SIF_LAYER)]
    if len(layers) != 1:
        raise RegistryError(str(ref), f"not a SIF artifact: {len(layers)} layers of type {mt.SIF_LAYER}")
    layer = layers[0]
    if not isinstance(layer.get("digest"), str) or not isinstance(layer.get("size"), int):
        raise RegistryError(str(ref), "the SIF layer descriptor lacks digest or size")
    return layer


def _manifest(registry: OrasRegistry, container: str, ref: Reference) -> tuple[bytes, dict[str, Any]]:
    """The manifest's exact bytes (for its digest) and parsed form."""
    url = f"{registry.prefix}://{registry.get_container(container).manifest_url()}"
    response = registry.do_request(url, "GET", headers={"Accept": mt.OCI_MANIFEST})
    if response.status_code == 404:
        raise RegistryError(str(ref), "no such artifact (manifest not found)")
    if response.status_code != 200:
        raise RegistryError(str(ref), f"GET manifest answered {response.status_code}")
    raw = response.content
    try:
        manifest = jsonedit.parse(raw)  # limits on crafted values: digits, range, depth
    except jsonedit.JsonError:
        raise RegistryError(str(ref), "the manifest is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise RegistryError(str(ref), "the manifest is not a JSON object")
    return raw, manifest
