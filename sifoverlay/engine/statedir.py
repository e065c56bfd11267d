"""Where lease records, the journal and scratch files live: a state directory out of the
image owner's reach, and the identity key that names an image there (docs/security.md).

Root (Slurm Prolog/Epilog/sweeper, the operator, a root CLI) uses the *root state
directory*: plugstack ``state_dir=`` / operator config / ``$SIFOVERLAY_STATE_DIR``, default
``/var/lib/sifoverlay``. Every component of it must be a real directory (no symlink),
owned by root and writable by nobody else, so a path inside it names what root put there.
It is world-readable and its records are 0644: an unprivileged `sifoverlay` sees that a
job holds an image (and refuses to write) without being able to create or remove records.

An unprivileged user without write access there keeps its own records in a per-user
state directory (``$SIFOVERLAY_STATE_DIR``, else ``$XDG_STATE_HOME/sifoverlay``, default
``~/.local/state/sifoverlay``) and *reads* the root one as well
(``$SIFOVERLAY_ROOT_STATE_DIR``, default ``/var/lib/sifoverlay``).

Images are named by identity, not path: ``<fsid>-<ino>`` of the open file (fsid from
statfs where the filesystem provides one, else st_dev). A rename or a hard link keeps one
image's records together; two images never share a key. Caveat (NFS and other network
filesystems): st_dev is assigned per client mount; statfs' fsid is the same on every node
only where the filesystem derives it from the server's export. Where neither is the same
on all nodes, cross-node exclusion of two jobs on one image rests on the per-node OFD lock
and on Slurm scheduling, not on the lease record (docs/security.md).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from sifoverlay.errors import NotAuthorized
from sifoverlay.fsio import REAL_IO, FileIO, open_beneath, open_dir_nofollow

__all__ = [
    "ENV_STATE_DIR",
    "ROOT_STATE_DIR",
    "check_root_owned",
    "configure",
    "default_dir",
    "ensure",
    "identity_key",
    "key_of_path",
    "leases_dir",
    "open_image_checked",
    "read_dirs",
    "root_dir",
    "scratch_dir",
]

ENV_STATE_DIR: Final = "SIFOVERLAY_STATE_DIR"
ROOT_STATE_DIR: Final = "/var/lib/sifoverlay"
ENV_ROOT_STATE_DIR: Final = "SIFOVERLAY_ROOT_STATE_DIR"  # where unprivileged users look for root's records
LEASES: Final = "leases"
SCRATCH: Final = "scratch"

_configured: list[str] = []


def configure(path: str | None) -> None:
    """Set this process's state directory (Slurm hooks: plugstack ``state_dir=``)."""
    _configured[:] = [os.path.abspath(path)] if path else []


class using:  # noqa: N801 - used like a function: `with statedir.using(path):`
    """Context manager: `configure(path)` for the duration, then the previous setting
    (the Slurm hooks wrap each job's work in it; tests stay isolated)."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._saved: list[str] = []

    def __enter__(self) -> None:
        self._saved = list(_configured)
        configure(self._path)

    def __exit__(self, *exc: object) -> None:
        _configured[:] = self._saved


def root_dir() -> str:
    """The root state directory: configured, else $SIFOVERLAY_STATE_DIR, else the default."""
    if _configured:
        return _configured[0]
    return os.path.abspath(os.environ.get(ENV_STATE_DIR) or ROOT_STATE_DIR)


def default_dir() -> str:
    """This process's own state directory (see the module docstring)."""
    if _configured:
        return _configured[0]
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return os.path.abspath(env)
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "sifoverlay")


def read_dirs(state_dir: str | None = None) -> list[str]:
    """State directories whose records count: our own, and (unprivileged) the root one."""
    own = os.path.abspath(state_dir) if state_dir else default_dir()
    out = [own]
    if os.geteuid() != 0 and state_dir is None:
        for other in (os.path.abspath(os.environ.get(ENV_ROOT_STATE_DIR) or ROOT_STATE_DIR),):
            if other != own and os.path.isdir(other):
                out.append(other)
    return out


def leases_dir(state_dir: str | None = None) -> str:
    return os.path.join(os.path.abspath(state_dir) if state_dir else default_dir(), LEASES)


def scratch_dir(state_dir: str | None = None) -> str:
    return os.path.join(os.path.abspath(state_dir) if state_dir else default_dir(), SCRATCH)


def check_root_owned(path: str) -> None:
    """Root only: every component of `path` is a real directory owned by root that no one
    else may write (sticky world-writable /tmp-like parents are refused too). NotAuthorized
    otherwise: root must not keep its records where a user can swap them."""
    parts = [p for p in os.path.abspath(path).split("/") if p]
    for depth in range(len(parts) + 1):
        here = "/" + "/".join(parts[:depth])
        try:
            fd = open_dir_nofollow(here)
        except OSError as exc:
            raise NotAuthorized(path, f"state directory component {here}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        last = depth == len(parts)
        if st.st_uid == 0 and not last and st.st_mode & stat.S_ISVTX:
            continue  # sticky (/tmp): others cannot rename or remove root's entries in it
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise NotAuthorized(path, f"state directory component {here} is not root-owned and private "
                                "(owner uid {}, mode {:o})".format(st.st_uid, stat.S_IMODE(st.st_mode)))


def ensure(directory: str, *, io: FileIO = REAL_IO, mode: int = 0o755) -> str:
    """Create `directory` (and parents) if needed; as root, check it is root's alone."""
    if not os.path.isdir(directory):
        io.makedirs(directory, mode)
    if os.geteuid() == 0:
        check_root_owned(directory)
    return directory


def birth_time_ns(fd: int) -> int:
    """statx btime of the file behind `fd` in ns, 0 where the filesystem has none."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        return 0
    buf = ctypes.create_string_buffer(256)
    if statx(ctypes.c_int(fd), b"", ctypes.c_int(0x1000), ctypes.c_uint(0x800), buf) != 0:  # AT_EMPTY_PATH, STATX_BTIME
        return 0
    import struct

    (mask,) = struct.unpack_from("<I", buf.raw, 0)
    if not mask & 0x800:
        return 0
    sec, nsec = struct.unpack_from("<qI", buf.raw, 80)
    return int(sec) * 1_000_000_000 + int(nsec)


def identity_key(fd: int) -> str:
    """``<fsid>-<ino>-<btime>`` of the open file `fd` (see the module docstring). The birth
    time tells a reused inode number from the file that had it before (0 where the
    filesystem has no btime: then a deleted image's leftover record may apply to a new
    file with its inode until the record is released or breakable)."""
    st = os.fstat(fd)
    fsid = 0
    try:
        fsid = int(os.fstatvfs(fd).f_fsid)
    except (OSError, AttributeError):
        fsid = 0
    if fsid == 0:
        fsid = st.st_dev
    return f"{fsid & 0xFFFFFFFFFFFFFFFF:016x}-{st.st_ino}-{birth_time_ns(fd):x}"


def open_image_checked(path: str, *, writable: bool = False, io: FileIO = REAL_IO,
                       expect_identity: tuple[int, int] | None = None) -> int:
    """The image at `path` as a checked fd: as root no symlink in any component (the
    directory resolved component by component), for everyone else O_NOFOLLOW on the last
    one; O_NONBLOCK and S_ISREG always; (st_dev, st_ino) == `expect_identity` when given
    (NotAuthorized otherwise, fd closed)."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    if os.geteuid() == 0:
        fd = open_beneath(os.path.abspath(path), flags, io=io)
    else:
        from sifoverlay.fsio import open_regular

        fd = open_regular(os.path.abspath(path), flags, io=io)
    if expect_identity is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(expect_identity):
            os.close(fd)
            raise NotAuthorized(path, "was replaced since it was authorized (another inode): not touched")
    return fd


def key_of_path(path: str) -> str:
    """The identity key of the image at `path` (checked open, see `open_image_checked`)."""
    fd = open_image_checked(path)
    try:
        return identity_key(fd)
    finally:
        os.close(fd)


def reopen(fd: int, *, writable: bool, io: FileIO = REAL_IO) -> int:
    """A new open file description of the very inode behind `fd` (through /proc/self/fd:
    no path lookup the user can influence)."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        return io.open(f"/proc/self/fd/{fd}", flags) if writable else os.open(f"/proc/self/fd/{fd}", flags)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise OSError(errno.EBADF, "descriptor is not open", str(fd)) from None
        raise
