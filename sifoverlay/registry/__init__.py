"""Registry push/pull of OCI-SIF images (integration layer, see docs/registry.md).

`push(image, ref)` ALWAYS reconciles first through `engine.sync` when the image has an
overlay, so a drifted overlay is never pushed with a stale digest; then:
* `oras://HOST/REPO:TAG`  -> the SIF file as an ORAS artifact (oras_push);
* `docker://HOST/REPO:TAG` -> the OCI image itself (docker_push), layers as stored
  (`layer_format="squashfs"`, SingularityCE-compatible) or converted to OCI tar layers
  (`layer_format="tar"`, runnable by any OCI runtime).
`pull(ref, out)` is the reverse (oras_pull, docker_pull). The local image is only read.
"""

from __future__ import annotations

import os
from typing import Any

from sifoverlay.errors import UsageError
from sifoverlay.fsio import REAL_IO, FileIO

from .client import Progress
from .refs import Reference, parse
from .results import PullResult
from .results import PushedLayer, PushResult

__all__ = ["PullResult", "PushResult", "PushedLayer", "Reference", "parse", "pull", "push", "reconcile_before_push"]

LAYER_FORMATS = ("squashfs", "tar")


def reconcile_before_push(image: str, *, journal_dir: str | os.PathLike[str] | None = None,
                          io: FileIO = REAL_IO, progress: Progress | None = None) -> dict[str, Any] | None:
    """engine.sync when the image has an overlay (its result as a dict), else None."""
    from sifoverlay import engine
    from sifoverlay.ocisif import open_image

    with open_image(image) as img:
        has_overlay = img.overlay is not None
    if not has_overlay:
        return None
    return engine.sync(image, journal_dir=journal_dir, io=io, progress=progress).as_dict()


def push(image: str | os.PathLike[str], ref: str | Reference, *, layer_format: str = "squashfs",
         plain_http: bool = False, progress: Progress | None = None,
         journal_dir: str | os.PathLike[str] | None = None, io: FileIO = REAL_IO) -> PushResult:
    """Reconcile `image` (if it has an overlay), then push it to `ref`."""
    path = os.fspath(image)
    target = parse(ref) if isinstance(ref, str) else ref
    if layer_format not in LAYER_FORMATS:
        raise UsageError(path, f"unknown layer format {layer_format!r} (choose squashfs or tar)")
    if target.scheme == "oras" and layer_format != "squashfs":
        raise UsageError(str(target), "--layer-format applies to docker:// pushes; oras:// pushes the SIF file")
    if target.digest is not None:
        raise UsageError(str(target), "push targets take a tag, not a digest")
    if not os.path.isfile(path):
        raise UsageError(path, "no such image file")
    synced = reconcile_before_push(path, journal_dir=journal_dir, io=io)
    from sifoverlay.engine import lease

    # Readers hold a lease too (docs/security.md): no writer changes the bytes being pushed.
    with lease.acquire_shared(path, lease.Holder.current(f"push-{os.getpid()}", "push"), io=io):
        if target.scheme == "oras":
            from .oras_push import push_file

            result = push_file(path, target, plain_http=plain_http, progress=progress, io=io)
        else:
            from sifoverlay.ocisif import open_image

            from .docker_push import push_image

            with open_image(path) as img:
                result = push_image(img, target, layer_format=layer_format, plain_http=plain_http, progress=progress)
    return _with_sync(result, synced)


def _with_sync(result: PushResult, synced: dict[str, Any] | None) -> PushResult:
    import dataclasses

    return dataclasses.replace(result, sync=synced)


def pull(ref: str | Reference, out: str | os.PathLike[str], *, plain_http: bool = False,
         platform: str | None = None, progress: Progress | None = None, io: FileIO = REAL_IO) -> PullResult:
    """Pull `ref` into the file `out` (written atomically, digests verified)."""
    source = parse(ref) if isinstance(ref, str) else ref
    dest = os.fspath(out)
    if source.scheme == "oras":
        from .oras_pull import pull_file

        return pull_file(source, dest, plain_http=plain_http, progress=progress, io=io)
    from .docker_pull import pull_image

    return pull_image(source, dest, plain_http=plain_http, platform=platform, progress=progress, io=io)
