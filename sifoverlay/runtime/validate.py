"""Checks before anything is mounted: tools and FUSE configuration, the image opened once
(O_NOFOLLOW) and validated through that fd, the job user's access, and the ext3's health
(e2fsck -p of a dirty overlay before a rw mount; the userspace gate before kernel mounts).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass

from sifoverlay.errors import Ext3FormatError, ExternalToolError, NotAuthorized, OverlayStateError, UsageError

from . import mounts

log = logging.getLogger(__name__)

FUSE_TOOLS = ("squashfuse", "fuse2fs", "fuse-overlayfs")
SQUASHFS_MAGIC = b"hsqs"


@dataclass(frozen=True, slots=True)
class Region:
    offset: int
    size: int


# --- validation ----------------------------------------------------------------------------------
def unprivileged() -> bool:
    """Are we an ordinary user (unprivileged exec: FUSE through fusermount3, the command in
    a user namespace)?"""
    return os.geteuid() != 0


def preflight(mode: str, uid: int) -> None:
    if unprivileged():
        if mode != "fuse":
            raise NotAuthorized(None, "kernel mounts need root; an unprivileged exec mounts with FUSE")
        if uid != os.geteuid():
            raise NotAuthorized(None, f"an unprivileged exec runs as its caller (uid {os.geteuid()}), not uid {uid}")
    needed: tuple[str, ...] = FUSE_TOOLS if mode == "fuse" else ("mount", "umount", "e2fsck", "dumpe2fs")
    needed += ("fusermount3",) if unprivileged() else ()
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        raise ExternalToolError(None, f"{mode} mode needs {', '.join(missing)} (not installed)", tool=missing[0],
                                returncode=127, output_tail="")
    if unprivileged():
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise UsageError("/dev/fuse", "not usable by this user (FUSE for ordinary users needs mode 0666)")
        return  # every mount is ours: no allow_other, no user_allow_other needed
    if mode == "fuse" and uid != 0:
        if not mounts.user_allow_other():
            raise UsageError(mounts.FUSE_CONF, "user_allow_other is not set: add that line so root can enter the job "
                                               "user's FUSE mounts (allow_other)")
        st = os.stat("/dev/fuse")
        if not st.st_mode & stat.S_IROTH or not st.st_mode & stat.S_IWOTH:
            raise UsageError("/dev/fuse", f"not usable by uid {uid} (mode {stat.S_IMODE(st.st_mode):04o}; "
                                          "FUSE for ordinary users needs 0666)")


def open_image(path: str, image_fd: int | None, *, rw: bool) -> int:
    flags = (os.O_RDWR if rw else os.O_RDONLY) | os.O_CLOEXEC
    if image_fd is not None:  # same inode as the caller's fd, with the access we need
        return os.open(f"/proc/self/fd/{image_fd}", flags)
    return os.open(path, flags | os.O_NOFOLLOW)


def validate(path: str, fd: int, writable: bool) -> tuple[list[Region], Region | None]:
    from sifoverlay.ext3 import Superblock, check_region_header
    from sifoverlay.ocisif import open_image
    from sifoverlay.ocisif.mediatypes import SQUASHFS_LAYER
    from sifoverlay.sif.load import SifFile

    sif = SifFile.from_fd(os.dup(fd), path)
    try:
        img = open_image(sif)
        layers = [lay for lay in img.layers if img.overlay is None or lay.descriptor != img.overlay.descriptor]
        for number, layer in enumerate(layers):
            if layer.media_type != SQUASHFS_LAYER:
                raise OverlayStateError(path, f"layer {number} is {layer.media_type}: only squashfs layers can be mounted")
            if os.pread(fd, 4, layer.offset) != SQUASHFS_MAGIC:
                raise OverlayStateError(path, f"layer {number} at offset {layer.offset} is not a squashfs filesystem")
        overlay = Region(img.overlay.offset, img.overlay.size) if img.overlay is not None else None
    finally:
        sif.close()
    if not layers and overlay is None:  # (an overlay alone is a rootfs: bench/gpu_check.sh builds one)
        raise OverlayStateError(path, "image has no squashfs layer and no overlay to run")
    if overlay is None and writable:
        raise OverlayStateError(path, "--writable needs an ext3 overlay and this image has none "
                                      "(add one with: sifoverlay overlay create)")
    if overlay is not None:
        try:
            Superblock.read(fd, overlay.offset, size=overlay.size)
            check_region_header(fd, overlay.offset)
        except Ext3FormatError as exc:
            raise Ext3FormatError(path, f"ext3 overlay at offset {overlay.offset}: {exc.problem}") from None
    return [Region(lay.offset, lay.size) for lay in layers], overlay


def check_user_access(path: str, fd: int, uid: int, gid: int, writable: bool) -> None:
    """The job user (not root) must be able to read - and for rw, write - the image."""
    if uid == 0:
        return
    if unprivileged():  # we are the job user: ask the kernel about the inode behind our fd
        if not os.access(f"/proc/self/fd/{fd}", os.W_OK if writable else os.R_OK):
            raise NotAuthorized(path, f"uid {uid} may not {'write' if writable else 'read'} the image")
        return
    test = shutil.which("test") or "/usr/bin/test"
    proc = subprocess.run([test, "-w" if writable else "-r", f"/proc/self/fd/{fd}"], user=uid, group=gid,
                          extra_groups=[], pass_fds=(fd,), cwd="/", check=False)
    if proc.returncode != 0:
        raise NotAuthorized(path, f"uid {uid} may not {'write' if writable else 'read'} the image")


def prepare_ext3(path: str, fd: int, overlay: Region, *, writable: bool, kernel: bool, uid: int, gid: int) -> None:
    """Replay/repair a dirty ext3 before a rw mount; in kernel mode also refuse an ext3
    that a read-only userspace e2fsck finds broken, before the kernel driver sees it.
    Both run as the job user (uid/gid), unprivileged, on `fd` - never as root, never
    through a loop device, never on the path (docs/security.md, finding 4)."""
    from sifoverlay.ext3 import Superblock, replay_and_fsck

    sb = Superblock.read(fd, overlay.offset, size=overlay.size)
    if writable and sb.is_dirty:
        log.info("%s: ext3 overlay is dirty (needs_recovery=%s): e2fsck -p first", path, sb.needs_recovery)
        replay_and_fsck(path, overlay.offset, overlay.size, fd=fd, as_user=(uid, gid))
    if kernel:
        replay_and_fsck(path, overlay.offset, overlay.size, fd=fd, check_only=True, as_user=(uid, gid))
