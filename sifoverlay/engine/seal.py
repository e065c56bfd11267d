"""`overlay seal`: turn the overlay's upper/ into a squashfs layer replacing the ext3.

The ext3 is mounted read-only with fuse2fs (FUSE, not the kernel: the filesystem is user
bytes, and a corrupt ext3 must not reach the kernel's ext4 driver) at its offset inside
the SIF; `sifoverlay.upper.upper_to_squashfs` converts upper/ (kernel overlayfs and
fuse-overlayfs whiteout conventions) into a squashfs file beside the image; the commit
replaces the last layer (media type squashfs, digest = diff_id = sha256 of the file),
frees the ext3 object and GC punches its bytes (or truncates them when trailing).
A dirty ext3 is replayed + fsck'd first, as for sync.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator

from sifoverlay.errors import ExternalToolError, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .commit import BlobSource, OpResult, commit
from .history import Who, draft
from .journal import Journal
from .recover import pid_alive, scratch_file

log = logging.getLogger(__name__)


MOUNT_PREFIX = ".sifoverlay-seal-"
MOUNT_TIMEOUT = 30.0


def _die_with_parent() -> None:
    """preexec: fuse2fs gets SIGTERM when the sealing process dies (even by SIGKILL),
    so a killed seal leaves at worst a dead mount entry, never a live daemon."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def mounted_ro(image: str, offset: int, *, fd: int | None = None) -> Iterator[str]:
    """fuse2fs read-only mount of the ext3 at `offset` on a private temp directory. With
    `fd`, fuse2fs opens that very inode (/dev/fd/N, inherited), never the path."""
    mountpoint = tempfile.mkdtemp(prefix=f"{MOUNT_PREFIX}{os.getpid()}-")
    source = image if fd is None else f"/dev/fd/{fd}"
    proc = subprocess.Popen(
        ["fuse2fs", "-f", "-o", f"ro,offset={offset}", source, mountpoint], pass_fds=() if fd is None else (fd,),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - a single prctl, no locks involved
    )
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None and proc.stderr else ""
                raise ExternalToolError(image, f"fuse2fs could not mount the overlay read-only: {err.strip() or 'timeout'}",
                                        tool="fuse2fs", returncode=proc.returncode, output_tail=err[-600:])
            time.sleep(0.02)
        yield mountpoint
    finally:
        _unmount(mountpoint)
        try:
            proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.rmdir(mountpoint)  # io-seam: exempt (our empty scratch mountpoint, not image data)


def _unmount(mountpoint: str) -> None:
    for argv in (["fusermount3", "-u", mountpoint], ["fusermount", "-u", mountpoint], ["umount", mountpoint]):
        if not os.path.ismount(mountpoint):
            return
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


def sweep_dead_mounts() -> list[str]:
    """Lazily unmount seal mountpoints whose fuse2fs died with a killed seal."""
    from .procs import unescape_mount_field as _unescape
    from .quiesce import _dead_mount

    swept: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return swept
    for line in lines:
        fields = line.split(" - ", 1)[0].split()
        if len(fields) < 5:
            continue
        mountpoint = _unescape(fields[4])
        if os.path.basename(mountpoint).startswith(MOUNT_PREFIX) and _dead_mount(mountpoint):
            for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
                if subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode == 0:
                    break
            try:
                os.rmdir(mountpoint)  # io-seam: exempt (empty scratch mountpoint of a dead seal)
            except OSError:
                pass
            swept.append(mountpoint)
    # Empty mountpoints of killed seals (fuse2fs unmounted itself on SIGTERM).
    scratch = tempfile.gettempdir()
    for name in os.listdir(scratch):
        pid = name[len(MOUNT_PREFIX) :].split("-", 1)[0]
        path = os.path.join(scratch, name)
        if name.startswith(MOUNT_PREFIX) and pid.isdigit() and not pid_alive(int(pid)) and not os.path.ismount(path):
            try:
                os.rmdir(path)  # io-seam: exempt (empty scratch mountpoint of a dead seal)
                swept.append(path)
            except OSError:
                pass
    return swept


def seal(
    path: str | os.PathLike[str],
    *,
    journal_dir: str | os.PathLike[str] | None = None,
    io: FileIO = REAL_IO,
    now: int | None = None,
    image_fd: int | None = None,
    expect_identity: tuple[int, int] | None = None,
    who: Who | None = None,
) -> OpResult:
    """Seal through one checked descriptor (`image_fd` re-opened through /proc/self/fd, else
    the path opened with statedir.open_image_checked), verified against `expect_identity`."""
    from sifoverlay.upper import upper_to_squashfs

    from . import plan
    from .overlayop import exclusive_overlay

    start = time.monotonic()
    image = os.fspath(path)
    journal = Journal(journal_dir, io=io)
    sweep_dead_mounts()
    with exclusive_overlay(image, source="seal", journal=journal, io=io, image_fd=image_fd,
                           expect_identity=expect_identity) as (_fd, sif, img, overlay):
        with scratch_file(image, "sqfs", io=io) as scratch:
            with mounted_ro(image, overlay.offset, fd=sif.fd) as mountpoint:
                upper = os.path.join(mountpoint, "upper")
                if not os.path.isdir(upper):
                    raise OverlayStateError(image, "overlay has no upper/ directory: nothing to seal")
                digest, size = upper_to_squashfs(upper, scratch, io=io)  # hashed once, there
            revision = draft("seal", who, old_overlay=overlay.recorded_digest, new_overlay=None, bytes_hashed=size,
                             detail={"layer": digest})
            planned = plan.plan_seal(img, squashfs=BlobSource(digest, size, path=scratch), now=now,
                                     revision=revision)
            commit(image, sif.fd, planned, journal, io=io)
    offset = next((b.offset for b in planned.blobs if b.source.digest == digest), -1)
    log.info("%s: sealed overlay into squashfs layer %s (%d bytes)", image, digest, size)
    return OpResult("sealed", image, planned.old_root_digest, planned.new_root_digest, digest, offset, size,
                    time.monotonic() - start)
