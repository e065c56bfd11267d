"""May this job's user use this image? Decided with the user's own credentials.

The Prolog runs as root, so root's view ("root can write anything") says nothing. The
check opens the image in a child process that has switched to the job's uid, gid and
groups: O_RDWR for a writable job, O_RDONLY for ``:ro``, always O_NOFOLLOW. The answer
is the (st_dev, st_ino) the user reached; root's own O_NOFOLLOW fd must be that same
inode, and `verify_unchanged` compares the path with it again after every later step,
so a symlink or rename swap between check and use is refused.

Images must lie below one of the configured image roots after resolving the symlinks of
the directories (the last component itself may never be a symlink).
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from dataclasses import dataclass

from sifoverlay.errors import NotAuthorized, UsageError
from sifoverlay.fsio import open_beneath

__all__ = ["ImageIdentity", "authorize", "canonical_path", "under_roots", "verify_unchanged"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageIdentity:
    path: str  # canonical path: directories resolved, last component as given
    dev: int
    ino: int
    fd: int  # root's O_RDONLY|O_NOFOLLOW fd on the checked inode (caller closes it)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def canonical_path(requested: str) -> str:
    if not requested.startswith("/"):
        raise UsageError(requested, "image path is not absolute")
    name = os.path.basename(requested.rstrip("/"))
    if name in ("", ".", ".."):
        raise UsageError(requested, "image path does not name a file")
    return os.path.join(os.path.realpath(os.path.dirname(requested)), name)


def under_roots(path: str, roots: tuple[str, ...]) -> bool:
    for root in roots:
        real = os.path.realpath(root)
        if path.startswith(real.rstrip("/") + "/"):
            return True
    return False


def _open_as_user(path: str, uid: int, gid: int, user: str | None, writable: bool) -> tuple[int, int] | int:
    """(st_dev, st_ino) of what `uid` opens at `path`, or the errno it got."""
    try:
        groups = os.getgrouplist(user, gid) if user else [gid]
    except (KeyError, OSError):
        groups = [gid]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the user, try, report, _exit — nothing else
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
            fd = os.open(path, flags)
            st = os.fstat(fd)
            answer = f"ok {st.st_dev} {st.st_ino}"
        except OSError as exc:
            answer = f"err {exc.errno or errno.EIO}"
        except BaseException:
            answer = f"err {errno.EIO}"
        try:
            os.write(write_end, answer.encode())  # io-seam: exempt (a pipe to the parent, not a file)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        raw = b""
        while chunk := os.read(read_end, 256):
            raw += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    words = raw.decode().split()
    if len(words) == 3 and words[0] == "ok":
        return int(words[1]), int(words[2])
    return int(words[1]) if len(words) == 2 else errno.EIO


def authorize(
    requested: str,
    *,
    uid: int,
    gid: int,
    user: str | None,
    writable: bool,
    image_roots: tuple[str, ...],
) -> ImageIdentity:
    """Check `requested` for the job's user; raises NotAuthorized / UsageError with a
    one-line message naming the image. Returns root's fd on the checked inode."""
    path = canonical_path(requested)
    if image_roots and not under_roots(path, image_roots):
        raise NotAuthorized(path, f"outside the allowed image roots ({':'.join(image_roots)})")
    if not image_roots:
        log.warning("%s: no image_roots configured: any path is accepted", path)
    try:
        # Directory resolved component by component without following symlinks, the
        # image itself O_NOFOLLOW|O_NONBLOCK and a regular file (fsio.open_beneath).
        fd = open_beneath(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotAuthorized(path, "is a symbolic link: give the image's real path") from None
        if exc.errno == errno.EINVAL:
            raise UsageError(path, "not a regular file") from None
        raise UsageError(path, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(path, "not a regular file")
        name = user or _user_name(uid)
        answer = _open_as_user(path, uid, gid, name, writable)
        if isinstance(answer, int):
            verb = "write" if writable else "read"
            if answer in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise NotAuthorized(path, f"user {name} (uid {uid}) may not {verb} this image")
            if answer == errno.ELOOP:
                raise NotAuthorized(path, "is a symbolic link: give the image's real path")
            raise NotAuthorized(path, f"user {name} (uid {uid}) cannot open it: {os.strerror(answer)}")
        if answer != (st.st_dev, st.st_ino):
            raise NotAuthorized(path, "was replaced while it was being checked (symlink or rename swap)")
        identity = ImageIdentity(path, st.st_dev, st.st_ino, fd)
    except BaseException:
        os.close(fd)
        raise
    log.info("%s: user %s (uid %d) may %s it", path, name, uid, "write" if writable else "read")
    return identity


def verify_unchanged(path: str, dev: int, ino: int) -> None:
    """Raise NotAuthorized when `path` no longer names inode (dev, ino)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotAuthorized(path, "disappeared after it was checked (rename swap?)") from None
    if (st.st_dev, st.st_ino) != (dev, ino) or not stat.S_ISREG(st.st_mode):
        raise NotAuthorized(path, "was replaced after it was checked (symlink or rename swap)")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
