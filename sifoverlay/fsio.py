"""The one I/O seam: every mutating syscall of the format layer, engine, journal, lease
and metrics textfile goes through an `FileIO` object passed explicitly (``io=``).

The real object is `REAL_IO`. Crash tests substitute a subclass whose `_before` hook
counts operations and "crashes" at operation N (raise, or SIGKILL itself), and whose op
log lets a power-loss simulator drop writes not covered by a later fsync.

Reads are not routed here: they cannot damage anything.
A guard test (tests/test_io_seam.py) scans the package for writes outside this module.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


class SimulatedCrash(BaseException):
    """Raised by crash-test I/O at the chosen operation (BaseException: nothing catches it)."""


class FileIO:
    """Mutating file operations. Subclasses override `_before` to observe or interrupt."""

    def _before(self, op: str, **info: object) -> None:  # noqa: B027 - hook
        """Called before every mutating operation with its name and arguments."""

    # -- descriptors ---------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o644, *, dir_fd: int | None = None) -> int:
        """os.open (relative to `dir_fd` when given); counted as a mutation only when it
        can create or truncate."""
        if flags & (os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_RDWR):
            if dir_fd is None:
                self._before("open", path=path, flags=flags, mode=mode)
            else:
                self._before("open", path=path, flags=flags, mode=mode, dir_fd=dir_fd)
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data` at `offset` (loops on short writes)."""
        self._before("pwrite", fd=fd, offset=offset, length=len(data), data=data)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
            offset += n

    def truncate(self, fd: int, length: int) -> None:
        self._before("truncate", fd=fd, length=length)
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self._before("fsync", fd=fd)
        os.fsync(fd)

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): reads back as zeros, file size kept.
        Falls back to writing zeros where the filesystem cannot punch holes."""
        if length <= 0:
            return
        self._before("punch_hole", fd=fd, offset=offset, length=length)
        try:
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            chunk = bytes(min(length, 1 << 20))
            end = offset + length
            while offset < end:
                n = min(len(chunk), end - offset)
                os.pwrite(fd, chunk[:n], offset)
                offset += n

    # -- names ---------------------------------------------------------------------
    def rename(self, src: str, dst: str) -> None:
        self._before("rename", src=src, dst=dst)
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        """Hard link (atomic create-if-absent on shared filesystems: used by leases)."""
        self._before("link", src=src, dst=dst)
        os.link(src, dst)

    def unlink(self, path: str) -> None:
        self._before("unlink", path=path)
        os.unlink(path)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._before("mkdir", path=path, mode=mode)
        os.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        self._before("rmdir", path=path)
        os.rmdir(path)

    def chmod(self, path: str, mode: int) -> None:
        self._before("chmod", path=path, mode=mode)
        os.chmod(path, mode)

    def fsync_dir(self, path: str) -> None:
        self._before("fsync_dir", path=path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- external tools ----------------------------------------------------------------
    def external(self, tool: str, paths: Sequence[str], call: Callable[[], T]) -> T:
        """Run `call`, an external tool (mkfs, e2fsck through a loop device, tar2sqfs) that
        writes `paths` through its own descriptors. To crash tests it is one opaque
        operation: a crash point before it, and its effect is the state of `paths` after it
        (the caller fsyncs them afterwards, like any other write)."""
        self._before("external", tool=tool, paths=tuple(paths))
        return call()

    # -- composites (built only from the primitives above) ---------------------------
    def makedirs(self, path: str, mode: int = 0o755) -> None:
        if os.path.isdir(path):
            return
        parent = os.path.dirname(os.path.abspath(path))
        if parent and not os.path.isdir(parent):
            self.makedirs(parent, mode)
        try:
            self.mkdir(path, mode)
        except FileExistsError:
            pass

    def write_file_atomic(self, path: str, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
        """temp file in the same directory + rename; with `durable`, fsync the file before
        the rename and the directory after it (R12). Metrics textfiles pass durable=False."""
        directory = os.path.dirname(os.path.abspath(path))
        # pid alone is not unique: two threads of one process, or two containers (each its
        # own pid 1) writing into one shared directory, would rename each other's temp file
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            self.pwrite(fd, data, 0)
            if durable:
                self.fsync(fd)
        finally:
            self.close(fd)
        try:
            self.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if durable:
            self.fsync_dir(directory)


class CountingIO(FileIO):
    """Counts operations and interrupts at operation `crash_at` (1-based).

    mode "raise": raise SimulatedCrash (in-process harness);
    mode "kill": SIGKILL the current process (real-process harness, CRASH_AT=N).
    `log` keeps (op, info) for every operation seen, for the power-loss simulator; with
    `name_fds`, every file an entry touches is named by absolute path (`name_files`:
    "fd" -> "path", names relative to a dir_fd joined to its directory).
    """

    def __init__(
        self, crash_at: int | None = None, mode: str = "raise", keep_log: bool = False, *, name_fds: bool = False
    ) -> None:
        self.crash_at = crash_at
        self.mode = mode
        self.count = 0
        self.keep_log = keep_log
        self.name_fds = name_fds
        self.log: list[tuple[str, dict[str, object]]] = []

    def _before(self, op: str, **info: object) -> None:
        self.count += 1
        if self.name_fds:
            info = name_files(info)
        if self.keep_log:
            data = info.get("data")
            if isinstance(data, (bytes, bytearray, memoryview)):  # only pwrite passes data
                info = dict(info, data=bytes(data))
            self.log.append((op, info))
        if self.crash_at is not None and self.count >= self.crash_at:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise SimulatedCrash(f"crash at op {self.count} ({op})")


# dir_fd-style keyword -> the name keywords it anchors (os.* conventions; src/dst for two-name ops)
_DIR_FD_NAMES: Final = {"dir_fd": ("path", "name", "src", "dst"), "src_dir_fd": ("src",), "dst_dir_fd": ("dst",)}


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def name_files(info: dict[str, object]) -> dict[str, object]:
    """`info` with every file it touches named by absolute path, whatever the op's form:
    an "fd" gets "path" (the file behind it; a directory fd names the directory); a name
    relative to a "dir_fd" / "src_dir_fd" / "dst_dir_fd" is joined to that directory
    (the fd-relative "at" calls: the power-loss simulator needs paths, not descriptors)."""
    out = dict(info)
    fd = info.get("fd")
    if isinstance(fd, int) and "path" not in info:
        out["path"] = _fd_target(fd)
    for key, names in _DIR_FD_NAMES.items():
        dir_fd = info.get(key)
        if not isinstance(dir_fd, int) or isinstance(dir_fd, bool):
            continue
        base = _fd_target(dir_fd)
        for name in names:
            value = info.get(name)
            if isinstance(value, (str, bytes)) and base is not None:
                text = os.fsdecode(value)
                out[name] = text if os.path.isabs(text) else os.path.join(base, text)
        out.setdefault("dir_path", base)
    return out


def io_from_env() -> FileIO:
    """REAL_IO, or a killing CountingIO when SIFOVERLAY_CRASH_AT=N is set (test harness)."""
    value = os.environ.get("SIFOVERLAY_CRASH_AT")
    if value and value.isdigit():
        return CountingIO(int(value), mode="kill")
    return REAL_IO


@functools.cache
def _libc_fallocate() -> Any:
    """libc's fallocate(2), bound once from the C library this interpreter already runs on
    (dlsym of the process), not ctypes.util.find_library, which forks `ldconfig -p`."""
    import ctypes

    func = ctypes.CDLL(None, use_errno=True).fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return func


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc_fallocate()(fd, mode, offset, length) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))



# -- checked opens for root-side code (docs/security.md): never follow a symlink, never
# block on a FIFO or device, only regular files / real directories. Reads only: they are
# not mutations, but they live here so every layer can use the one implementation.
O_PATH: Final = getattr(os, "O_PATH", 0o10000000)
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_NO_MAGICLINKS: Final = 0x02
_SYS_OPENAT2: Final = 437  # x86_64, aarch64 and most others share the number
_AT_FDCWD: Final = -100
_openat2_state: list[bool] = []  # [] unknown, [True] works, [False] ENOSYS/unsupported


def _openat2(path: str, flags: int, resolve: int) -> int | None:
    """openat2(AT_FDCWD, path, {flags, 0, resolve}); None when the kernel lacks it."""
    if _openat2_state == [False]:
        return None
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = OpenHow(flags, 0, resolve)
    fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        _openat2_state[:] = [True]
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _openat2_state != [True]:  # EPERM: seccomp filters
        _openat2_state[:] = [False]
        return None
    raise OSError(err, os.strerror(err), path)


def open_dir_nofollow(path: str) -> int:
    """An O_PATH|O_DIRECTORY fd on the absolute directory `path`, resolved without following
    any symlink in any component (openat2 RESOLVE_NO_SYMLINKS, else component by component
    with O_NOFOLLOW). ELOOP / ENOTDIR when a component is a symlink or not a directory."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, "directory path is not absolute", path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EINVAL, "'..' in a directory path", path)
    flags = O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = _openat2("/" + "/".join(parts), flags, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    if fd is not None:
        return fd
    fd = os.open("/", flags)
    try:
        for part in parts:
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(fd: int, name: str) -> os.stat_result:
    """fstat(fd), raising OSError(EINVAL) (fd closed) unless it is a regular file."""
    import stat as _stat

    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not _stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", name)
    return st


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o644, *, dir_fd: int | None = None,
                 io: FileIO | None = None) -> int:
    """Open a regular file with O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC (relative to `dir_fd`), then
    check S_ISREG (a FIFO, device or socket is refused, never waited on). Mutating opens go
    through `io` (default REAL_IO)."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if flags & (os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_RDWR):
        fd = (io or REAL_IO).open(path, flags, mode, dir_fd=dir_fd)
    else:
        fd = os.open(path, flags, dir_fd=dir_fd)
    check_regular(fd, path)
    return fd


def open_beneath(path: str, flags: int = os.O_RDONLY, mode: int = 0o644, *, io: FileIO | None = None) -> int:
    """`open_regular` of the absolute `path`: its directory resolved by `open_dir_nofollow`,
    the last component opened relative to it with O_NOFOLLOW. No symlink anywhere."""
    directory, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise OSError(errno.EINVAL, "path does not name a file", path)
    dir_fd = open_dir_nofollow(directory or "/")
    try:
        return open_regular(name, flags, mode, dir_fd=dir_fd, io=io)
    finally:
        os.close(dir_fd)

REAL_IO: Final[FileIO] = FileIO()
