"""`--layer-format tar`: turn the image's squashfs layers and its overlay's `upper/` into
gzip OCI tar layers, streamed straight into blob uploads.

Each layer is exposed read-only through FUSE at its offset inside the image, never a
kernel mount of user bytes: `squashfuse -o ro,offset=N` for squashfs layers,
`fuse2fs -o ro,offset=N` for the ext3 overlay (its `upper/` is the layer). The tree is
rendered by `sifoverlay.upper.upper_to_tar`, which already speaks both whiteout
conventions: char 0:0 -> `.wh.NAME`, opaque dirs (trusted/user.overlay.opaque or a
fuse-overlayfs sentinel) -> `DIR/.wh..wh..opq`, overlayfs xattrs dropped, other xattrs as
PAX records, hard links as LNKTYPE, byte-sorted names. The diff_id (sha256 of the tar)
and the digest (sha256 of the gzip) are both computed while the bytes stream out.
Reading `trusted.*` xattrs through FUSE needs CAP_SYS_ADMIN: run as root (an EPERM is
an error, never a silently lost opaque marker).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from sifoverlay.errors import ExternalToolError, OverlayStateError
from sifoverlay.runtime import mounts
from sifoverlay.upper import upper_to_tar

from .blobs import ProgressTotal, PushedBlob, StreamingBlob
from .client import RegistryClient

log = logging.getLogger(__name__)

GZIP_LEVEL: Final = 1  # gzip is the bottleneck (~60 MB/s at -6 on one core); ggcr uses BestSpeed too


@dataclass(frozen=True, slots=True)
class TarLayer:
    blob: PushedBlob
    diff_id: str  # sha256 of the uncompressed tar
    tar_size: int


class _HashingGzip:
    """gzip writer that also hashes what it compresses. No flush(): upper_to_tar would
    call it, and a zlib sync flush changes the compressed bytes for nothing."""

    def __init__(self, sink: StreamingBlob) -> None:
        # mtime=0 and no file name: the same tree always gives the same blob digest
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=GZIP_LEVEL, mtime=0)  # type: ignore[arg-type]
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        return self._gzip.write(data)

    def close(self) -> str:
        self._gzip.close()  # writes the gzip trailer into the sink; does not close it
        return "sha256:" + self._hash.hexdigest()


def stream_tree(client: RegistryClient, tree: str, tally: ProgressTotal | None) -> TarLayer:
    """Upload the directory `tree` (upper convention) as one gzip tar layer."""
    sink = StreamingBlob(client, tally)
    zipped = _HashingGzip(sink)
    diff_id, tar_size = upper_to_tar(tree, zipped)  # type: ignore[arg-type]
    zipped.close()
    blob = sink.close()
    log.info("%s: tar layer %s (diff_id %s, %d -> %d bytes)", client.ref, blob.digest, diff_id, tar_size, blob.size)
    return TarLayer(blob, diff_id, tar_size)


@contextlib.contextmanager
def fuse_view(kind: str, fd: int, offset: int) -> Iterator[str]:
    """Mount the squashfs or ext3 filesystem at `offset` of the open image `fd` read-only
    through FUSE in a private temp dir; yield the mount point; unmount and reap after."""
    work = tempfile.mkdtemp(prefix="sifoverlay-push-")
    target = os.path.join(work, "mnt")
    os.mkdir(target, 0o700)
    source = f"/proc/self/fd/{fd}"  # the daemon inherits this very fd: no path race
    if kind == "squashfs":
        argv = ["squashfuse", "-f", "-o", f"ro,offset={offset}", source, target]
    else:
        opts = f"ro,offset={offset}" + ("" if os.geteuid() == 0 else ",fakeroot")
        argv = ["fuse2fs", "-f", source, target, "-o", opts]
    if shutil.which(argv[0]) is None:
        shutil.rmtree(work, ignore_errors=True)
        raise ExternalToolError(None, f"{argv[0]} is not installed (needed for --layer-format tar)",
                                tool=argv[0], returncode=127, output_tail="")
    proc = None
    try:
        proc = mounts.spawn_fuse(argv, target, uid=None, gid=None, pass_fds=(fd,),
                                 log_path=os.path.join(work, "fuse.log"))
        yield target
    finally:
        try:
            mounts.unmount(target)
        finally:
            if proc is not None:
                mounts.stop_process(proc.pid, None, proc=proc, grace=10.0)
            shutil.rmtree(work, ignore_errors=True)


def stream_squashfs_layer(client: RegistryClient, fd: int, offset: int, tally: ProgressTotal | None) -> TarLayer:
    with fuse_view("squashfs", fd, offset) as root:
        return stream_tree(client, root, tally)


def stream_overlay_upper(client: RegistryClient, image: str, fd: int, offset: int,
                         tally: ProgressTotal | None) -> TarLayer:
    with fuse_view("ext3", fd, offset) as root:
        upper = os.path.join(root, "upper")
        if not os.path.isdir(upper):
            raise OverlayStateError(image, "the ext3 overlay has no upper/ directory")
        return stream_tree(client, upper, tally)
