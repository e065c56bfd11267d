"""`--layer-format tar`: turn the image's squashfs layers and its overlay's `upper/` into
gzip OCI tar layers, streamed straight into blob uploads.

User bytes are never kernel-mounted:
* squashfs layers: the layer's byte range is cloned into a scratch file
  (copy_file_range: in-kernel, a reflink where the filesystem can) and read by
  `sqfs2tar`, whose tar stream is rewritten entry by entry (spec §4, whiteoutsToAUFS):
  char 0:0 -> empty `.wh.NAME` (0600), a dir with `trusted.overlay.opaque=y` -> the dir
  without it + empty `DIR/.wh..wh..opq`. Not squashfuse: 0.1.105 lists `trusted.*`
  xattrs under `security.*`, so a walker would miss opaque dirs.
* the ext3 overlay: `fuse2fs -o ro,offset=N` on the image fd; its `upper/` is rendered
  by `sifoverlay.upper.upper_to_tar` (both whiteout conventions, fuse-overlayfs
  sentinels, overlayfs xattrs dropped, hard links kept, byte-sorted names). Reading
  `trusted.*` xattrs through FUSE needs CAP_SYS_ADMIN: run as root (an EPERM is an
  error, never a silently lost opaque marker).
Overlayfs bookkeeping xattrs are dropped, other xattrs kept as PAX SCHILY.xattr.*,
owners numeric. The diff_id (sha256 of the tar) and the digest (sha256 of the gzip) are
both computed while the bytes stream out to the registry.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from sifoverlay.errors import ExternalToolError, OverlayStateError, SifFormatError
from sifoverlay.ext3.tools import output_tail
from sifoverlay.ocisif.squashfs import COPY_BUF, HashingWriter, open_tar
from sifoverlay.runtime import mounts
from sifoverlay.upper import OPAQUE_MARKER as OPAQUE, OPAQUE_XATTRS, WHITEOUT_PREFIX as WHITEOUT
from sifoverlay.upper import is_overlay_xattr, upper_to_tar

from .blobs import ProgressTotal, PushedBlob, StreamingBlob
from .client import RegistryClient

log = logging.getLogger(__name__)

XATTR: Final = "SCHILY.xattr."
GZIP_LEVEL: Final = 1  # gzip is the bottleneck (~60 MB/s at -6 on one core); ggcr uses BestSpeed too


@dataclass(frozen=True, slots=True)
class TarLayer:
    blob: PushedBlob
    diff_id: str  # sha256 of the uncompressed tar
    tar_size: int


class _Gzip:
    """gzip writer with no flush(): upper_to_tar would call it, and a zlib sync flush
    changes the compressed bytes for nothing. The tar's diff_id is hashed by the caller's
    HashingWriter."""

    def __init__(self, sink: StreamingBlob) -> None:
        # mtime=0 and no file name: the same tree always gives the same blob digest
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=sink,  # type: ignore[arg-type]
                                   compresslevel=GZIP_LEVEL, mtime=0)

    def write(self, data: bytes) -> int:
        return self._gzip.write(data)

    def close(self) -> None:
        self._gzip.close()  # writes the gzip trailer into the sink; does not close it


def stream_tree(client: RegistryClient, tree: str, tally: ProgressTotal | None) -> TarLayer:
    """Upload the directory `tree` (upper convention) as one gzip tar layer."""
    return _upload_gzip_tar(client, tally, lambda zipped: upper_to_tar(tree, zipped))  # type: ignore[arg-type]


def _upload_gzip_tar(client: RegistryClient, tally: ProgressTotal | None,
                     write_tar: Callable[[_Gzip], tuple[str, int]]) -> TarLayer:
    """Upload, gzipped, the tar that `write_tar` writes; it returns (diff_id, tar size)."""
    sink = StreamingBlob(client, tally)
    try:
        zipped = _Gzip(sink)
        diff_id, tar_size = write_tar(zipped)
        zipped.close()
        blob = sink.close()
    except Exception:
        sink.cancel()
        raise
    log.info("%s: tar layer %s (diff_id %s, %d -> %d bytes)", client.ref, blob.digest, diff_id, tar_size, blob.size)
    return TarLayer(blob, diff_id, tar_size)


@contextlib.contextmanager
def ext3_view(fd: int, offset: int) -> Iterator[str]:
    """Mount the ext3 filesystem at `offset` of the open image `fd` read-only through
    FUSE in a private temp dir; yield the mount point; unmount and reap after."""
    if shutil.which("fuse2fs") is None:
        raise ExternalToolError(None, "fuse2fs is not installed (needed for --layer-format tar)",
                                tool="fuse2fs", returncode=127, output_tail="")
    work = tempfile.mkdtemp(prefix="sifoverlay-push-")
    target = os.path.join(work, "mnt")
    os.mkdir(target, 0o700)  # io-seam: exempt (mount point in our private temp dir)
    source = f"/proc/self/fd/{fd}"  # the daemon inherits this very fd: no path race
    opts = f"ro,offset={offset}" + ("" if os.geteuid() == 0 else ",fakeroot")
    argv = ["fuse2fs", "-f", source, target, "-o", opts]
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
            if mounts.is_mounted(target):  # never recurse into a mount that would not go
                log.warning("%s is still mounted; leaving %s in place", target, work)
            else:
                shutil.rmtree(work, ignore_errors=True)  # io-seam: exempt (our private temp dir)


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.REGTYPE, 0o600, 0, 0, 0
    info.uname = info.gname = ""
    return info


def _aufs_entries(member: tarfile.TarInfo) -> list[tarfile.TarInfo]:
    """One sqfs2tar entry in the AUFS convention (plus the opaque marker after a dir)."""
    parent, _, base = member.name.rstrip("/").rpartition("/")
    if member.type == tarfile.CHRTYPE and member.devmajor == 0 and member.devminor == 0:
        return [_marker(f"{parent}/{WHITEOUT}{base}" if parent else f"{WHITEOUT}{base}")]
    opaque = member.isdir() and any(member.pax_headers.get(f"{XATTR}{name}") == "y" for name in OPAQUE_XATTRS)
    member.pax_headers = {k: v for k, v in member.pax_headers.items()
                          if not (k.startswith(XATTR) and is_overlay_xattr(k[len(XATTR):]))}
    member.uname = member.gname = ""
    entries = [member]
    if opaque:
        entries.append(_marker(f"{member.name.rstrip('/')}/{OPAQUE}"))
    return entries


def stream_squashfs_layer(client: RegistryClient, image: str, fd: int, offset: int, size: int,
                          tally: ProgressTotal | None) -> TarLayer:
    if shutil.which("sqfs2tar") is None:
        raise ExternalToolError(None, "sqfs2tar is not installed (package squashfs-tools-ng)",
                                tool="sqfs2tar", returncode=127, output_tail="")
    with tempfile.TemporaryDirectory(prefix="sifoverlay-push-") as work:
        scratch = os.path.join(work, "layer.sqfs")
        _clone_range(image, fd, offset, size, scratch)
        return _upload_gzip_tar(client, tally, lambda zipped: _sqfs2tar_aufs(scratch, zipped))


def _sqfs2tar_aufs(squashfs: str, zipped: _Gzip) -> tuple[str, int]:
    """Run sqfs2tar on `squashfs` and write its tree in the AUFS convention to `zipped`;
    return the tar's (diff_id, size)."""
    sink = HashingWriter(zipped)  # type: ignore[arg-type]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(["sqfs2tar", "--no-skip", squashfs], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        failure: BaseException | None = None
        try:
            out = open_tar(sink)
            with tarfile.open(fileobj=proc.stdout, mode="r|") as source:
                for member in source:
                    data = source.extractfile(member) if member.isreg() else None
                    for entry in _aufs_entries(member):
                        out.addfile(entry, data if entry is member else None)
        except tarfile.TarError as exc:  # sqfs2tar's own exit code and message say more
            failure = exc
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        rc = proc.wait()
        if rc != 0 or failure is not None:
            errors.seek(0)
            tail = output_tail(errors.read().decode(errors="replace")) or str(failure)
            raise ExternalToolError(None, f"sqfs2tar failed (exit code {rc}): {tail}",
                                    tool="sqfs2tar", returncode=rc, output_tail=tail)
    out.close()  # end-of-archive blocks only after a complete, successful read
    return sink.digest, sink.count  # out.offset would miss the record padding


def _clone_range(image: str, fd: int, offset: int, size: int, dest: str) -> None:
    """Copy [offset, offset+size) of the image's fd into the new scratch file dest, in the kernel."""
    # io-seam: exempt (scratch copy in a private temp dir, deleted after sqfs2tar read it)
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # io-seam: exempt (scratch)
    try:
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(fd, out, size - done, offset + done)
            except OSError:  # e.g. EXDEV on old kernels: plain copy
                n = os.write(out, os.pread(fd, min(COPY_BUF, size - done), offset + done))  # io-seam: exempt (scratch)
            if n <= 0:
                raise SifFormatError(image, f"file ends inside the layer at byte {offset + done} (truncated?)")
            done += n
    finally:
        os.close(out)


def stream_overlay_upper(client: RegistryClient, image: str, fd: int, offset: int,
                         tally: ProgressTotal | None) -> TarLayer:
    with ext3_view(fd, offset) as root:
        upper = os.path.join(root, "upper")
        if not os.path.isdir(upper):
            raise OverlayStateError(image, "the ext3 overlay has no upper/ directory")
        return stream_tree(client, upper, tally)
