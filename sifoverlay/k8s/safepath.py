"""Resolve an image beneath its volume root without following symlinks.

The operator mounts shared volumes (a hostPath holding many namespaces' images). Users
write into those volumes from their workloads, so any directory or file below the root
may be a symlink planted to point the operator at another namespace's image, or out of
the volume. Every path the operator acts on is therefore resolved beneath the volume
root without following any symlink (fsio.open_dir_nofollow: openat2 RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS, or one component at a time with O_NOFOLLOW), with '.', '..' and
empty segments refused outright, so the walk can neither be redirected nor leave the root.

Every engine call of the operator then gets that very descriptor and its (st_dev,
st_ino) (`image_fd=fd, expect_identity=...`): the digests read at start, the sync, the
replay of an interrupted commit, seal, the manifest digest and the drift check. The
engine reopens the fd through /proc/self/fd, never the path, so a directory renamed or
swapped after the resolution cannot point any of them at another image.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from sifoverlay import fsio
from sifoverlay.errors import UsageError


class UnsafePath(UsageError):
    """The path crosses a symlink, leaves the volume root, or is not a regular file."""


class UnsafeStateDir(UnsafePath):
    """The engine's state or journal directory for an image (on its volume by default)
    is a symlink, or is not root-owned and private: a user could plant or swap records."""


def check_state_dirs(what: str, *directories: str | None) -> None:
    """Create (as root: root-owned) or check each of the engine's directories for an
    image - its state directory (lease records, scratch) and its journal - before
    anything uses them: as root every component must be a real directory, root-owned, not
    group/other-writable (engine.statedir.ensure). A `.sifoverlay-state` a user created on
    the shared volume from a workload, or planted as a symlink, is refused, not followed."""
    from sifoverlay.engine import statedir
    from sifoverlay.errors import NotAuthorized

    for directory in directories:
        if directory is None:
            continue
        try:
            statedir.ensure(directory, mode=0o700 if os.path.basename(directory).endswith("journal") else 0o755)
        except NotAuthorized as exc:
            raise UnsafeStateDir(what, f"engine directory {directory}: {exc.problem}; refused") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                raise UnsafeStateDir(what, f"engine directory {directory} is a symlink or not a directory; "
                                           "refused") from None
            raise


@dataclass(frozen=True, slots=True)
class Resolved:
    path: str  # root/path, for the engine's path-based API
    identity: tuple[int, int]  # (st_dev, st_ino) of the file found beneath the root
    dir_owner: int  # uid owning the file's directory
    dir_mode: int  # permission bits of that directory
    fd: int = -1  # with keep_open: a read-only fd of the file (the caller closes it)

    @property
    def dir_private(self) -> bool:
        """Nobody but root may create or swap entries in the image's directory (its
        scratch files there are then not replaceable by a user)."""
        return self.dir_owner == 0 and not self.dir_mode & (stat.S_IWGRP | stat.S_IWOTH)


def resolve_image(root: str, path: str, *, what: str, keep_open: bool = False) -> Resolved:
    """Resolve the image file `path` (relative, normalised) beneath the volume directory
    `root`: the directory through fsio.open_dir_nofollow (openat2 RESOLVE_NO_SYMLINKS |
    RESOLVE_NO_MAGICLINKS, else per component O_NOFOLLOW), the file relative to that fd
    with O_NOFOLLOW and an S_ISREG check (fsio.open_regular). UnsafePath if a symlink is
    crossed, the path would leave the root, or the result is not a regular file."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(what, f"{path!r} is not a normalised relative path beneath the volume root; refused")
    directory = os.path.join(os.path.abspath(root), *parts[:-1])
    try:
        dir_fd = fsio.open_dir_nofollow(directory)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
            raise UnsafePath(what, f"{path!r}: a directory on the way is a symlink or not a directory; refused") from None
        raise
    try:
        dst = os.fstat(dir_fd)
        try:
            fd = fsio.open_regular(parts[-1], dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL, errno.ENXIO):
                raise UnsafePath(what, f"{path!r} is a symlink or not a regular file; refused") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not keep_open:
        os.close(fd)
        fd = -1
    return Resolved(os.path.join(directory, parts[-1]), (st.st_dev, st.st_ino), dst.st_uid,
                    stat.S_IMODE(dst.st_mode), fd)
