"""Running e2fsprogs/util-linux tools and attaching loop devices at an offset.

Every tool runs with stdin=/dev/null (e2fsck and mkfs may otherwise prompt) and captured
output; a failure raises ExternalToolError(tool, returncode, output_tail).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sifoverlay.errors import ExternalToolError

log = logging.getLogger(__name__)

TAIL_LINES = 8
TAIL_CHARS = 600
# PATH of every tool the unprivileged fsck child runs (root never takes PATH from a caller)
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def unprivileged_argv(uid: int, gid: int) -> list[str]:
    """Prefix that runs a command as uid:gid with no supplementary groups, no capability
    (inheritable, ambient and bounding sets emptied) and no_new_privs: nothing it execs
    can gain privilege back (util-linux setpriv, found in TOOL_PATH only)."""
    if uid == 0 or gid == 0:
        raise ValueError("unprivileged_argv: refusing to run as uid/gid 0")
    setpriv = next((os.path.join(d, "setpriv") for d in TOOL_PATH.split(":")
                    if os.access(os.path.join(d, "setpriv"), os.X_OK)), "setpriv")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


_BOOTSTRAP = ("import runpy, sys; root = sys.argv.pop(1); module = sys.argv.pop(1); sys.path.insert(0, root); "
              "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def python_module_argv(module: str, *args: str) -> list[str]:
    """``python -m module args`` for a child that must find this very sifoverlay whatever
    its user and environment: -s -E (no user site-packages, no PYTHON* variables - the
    child may run as another user) and the package's own root put first on sys.path."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-s", "-E", "-c", _BOOTSTRAP, root, module, *args]


def loops_backed_by(st: os.stat_result, offset: int, size: int, sys_block: str = "/sys/block") -> list[str]:
    """Loop devices whose backing file is the inode `st` and whose range overlaps
    [offset, offset+size), from sysfs (no tool, nothing opened)."""
    found: list[str] = []
    try:
        names = sorted(n for n in os.listdir(sys_block) if n.startswith("loop"))
    except OSError:
        return found
    for name in names:
        base = os.path.join(sys_block, name, "loop")
        try:
            with open(os.path.join(base, "backing_file"), encoding="utf-8", errors="replace") as fh:
                backing = fh.read().strip()
            with open(os.path.join(base, "offset"), encoding="ascii") as fh:
                lo_offset = int(fh.read().strip() or 0)
            with open(os.path.join(base, "sizelimit"), encoding="ascii") as fh:
                limit = int(fh.read().strip() or 0)
            other = os.stat(backing)
        except (OSError, ValueError):
            continue
        if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
            continue
        end = lo_offset + limit if limit else other.st_size
        if end > offset and lo_offset < offset + size:
            found.append(f"/dev/{name}")
    return found


def output_tail(text: str) -> str:
    """The last few lines of a tool's output, joined on one line for error messages."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-TAIL_LINES:])
    return tail[-TAIL_CHARS:]


def run_tool(
    argv: Sequence[str],
    *,
    path: str | os.PathLike[str] | None,
    ok: Sequence[int] = (0,),
    timeout: float | None = 600,
) -> subprocess.CompletedProcess[str]:
    """Run argv; return the completed process when its exit code is in `ok`."""
    tool = os.path.basename(argv[0])
    log.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise ExternalToolError(path, f"{tool} is not installed", tool=tool, returncode=127, output_tail="") from None
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
        raise ExternalToolError(
            path, f"{tool} timed out after {timeout} s", tool=tool, returncode=-1, output_tail=output_tail(out)
        ) from None
    if proc.returncode not in ok:
        tail = output_tail(proc.stdout)
        raise ExternalToolError(
            path,
            f"{tool} failed with exit code {proc.returncode}: {tail or '(no output)'}",
            tool=tool,
            returncode=proc.returncode,
            output_tail=tail,
        )
    return proc


# losetup --find races with other processes grabbing the same free device; it retries
# internally, but can still report EBUSY, so try a few times before giving up.
_ATTACH_TRIES = 5


def attach_loop(path: str | os.PathLike[str], offset: int, size: int, *, read_only: bool = False) -> str:
    """Attach [offset, offset+size) of `path` to a free loop device; return its name."""
    argv = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    argv.append(os.fspath(path))
    last: ExternalToolError | None = None
    for attempt in range(_ATTACH_TRIES):
        try:
            device = run_tool(argv, path=path, timeout=60).stdout.strip()
        except ExternalToolError as exc:
            last = exc
            if exc.returncode == 127:
                raise
            time.sleep(0.1 * (attempt + 1))
            continue
        if device.startswith("/dev/"):
            log.debug("attached %s at offset %d size %d to %s", path, offset, size, device)
            return device
        last = ExternalToolError(path, f"losetup printed no device: {device!r}", tool="losetup",
                                 returncode=0, output_tail=output_tail(device))
    assert last is not None
    raise last


_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"  # struct loop_info64


@dataclass(frozen=True, slots=True)
class LoopBinding:
    """What a loop device really serves, from the kernel (LOOP_GET_STATUS64)."""

    st_dev: tuple[int, int]  # (major, minor) of the backing file's filesystem
    st_ino: int
    offset: int
    sizelimit: int


def loop_binding(device: str) -> LoopBinding:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(struct.calcsize(_LOOP_INFO64)))
    finally:
        os.close(fd)
    lo_device, lo_inode, _rdev, lo_offset, lo_sizelimit = struct.unpack_from("=QQQQQ", raw)
    # huge_encode_dev(): minor bits 0-7 and 20-31, major bits 8-19
    major = (lo_device & 0xFFF00) >> 8
    minor = (lo_device & 0xFF) | ((lo_device >> 12) & 0xFFF00)
    return LoopBinding((major, minor), lo_inode, lo_offset, lo_sizelimit)


def serves(binding: LoopBinding, st: os.stat_result, offset: int, size: int) -> bool:
    """Does the loop device serve exactly [offset, offset+size) of the file `st`?"""
    return (binding.st_dev == (os.major(st.st_dev), os.minor(st.st_dev)) and binding.st_ino == st.st_ino
            and binding.offset == offset and binding.sizelimit == size)


_DETACH_WAIT = 5.0


def detach_loop(device: str) -> None:
    """Detach a loop device and wait until the kernel has really let go of it.

    When something still has the device open (a blkid probe, say), `losetup -d` only
    sets autoclear and returns; the backing file stays attached until the last close.
    Callers that check "is this range attached?" right afterwards must not see it.
    """
    for attempt in range(_ATTACH_TRIES):
        try:
            run_tool(["losetup", "--detach", device], path=device, timeout=60)
            break
        except ExternalToolError:
            if attempt == _ATTACH_TRIES - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    backing = f"/sys/block/{os.path.basename(device)}/loop/backing_file"
    deadline = time.monotonic() + _DETACH_WAIT
    while os.path.exists(backing):
        if time.monotonic() > deadline:
            log.warning("%s is still attached %.0f s after detach (held open elsewhere)", device, _DETACH_WAIT)
            return
        time.sleep(0.01)


@contextlib.contextmanager
def loop_device(
    path: str | os.PathLike[str], offset: int, size: int, *, read_only: bool = False
) -> Iterator[str]:
    """Context manager: a loop device over the byte range, always detached afterwards."""
    device = attach_loop(path, offset, size, read_only=read_only)
    try:
        yield device
    finally:
        detach_loop(device)
