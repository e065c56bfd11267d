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
import os
import signal
from typing import Final

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


class SimulatedCrash(BaseException):
    """Raised by crash-test I/O at the chosen operation (BaseException: nothing catches it)."""


class FileIO:
    """Mutating file operations. Subclasses override `_before` to observe or interrupt."""

    def _before(self, op: str, **info: object) -> None:  # noqa: B027 - hook
        """Called before every mutating operation with its name and arguments."""

    # -- descriptors ---------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """os.open; counted as a mutation only when it can create or truncate."""
        if flags & (os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_RDWR):
            self._before("open", path=path, flags=flags, mode=mode)
        return os.open(path, flags, mode)

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
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
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
    `name_fds`, each entry that has an "fd" also gets "path", the file behind it (or None).
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
        fd = info.get("fd")
        if self.name_fds and isinstance(fd, int):
            try:
                info["path"] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                info["path"] = None
        if self.keep_log:
            data = info.get("data")
            if isinstance(data, (bytes, bytearray, memoryview)):  # only pwrite passes data
                info = dict(info, data=bytes(data))
            self.log.append((op, info))
        if self.crash_at is not None and self.count >= self.crash_at:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise SimulatedCrash(f"crash at op {self.count} ({op})")


def io_from_env() -> FileIO:
    """REAL_IO, or a killing CountingIO when SIFOVERLAY_CRASH_AT=N is set (test harness)."""
    value = os.environ.get("SIFOVERLAY_CRASH_AT")
    if value and value.isdigit():
        return CountingIO(int(value), mode="kill")
    return REAL_IO


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


REAL_IO: Final[FileIO] = FileIO()
