"""Mount primitives of the runtime: FUSE daemons run as the job user, loop devices bound
to an already-open fd, kernel mounts, unmounting, and what is mounted (engine.procs).

FUSE daemons run in the foreground (``-f``) as children in their own session, so their
pid is known: teardown waits for each daemon to exit after the unmount, because fuse2fs
writes the ext3 superblock back only when it shuts down (crash-safety.md R8).

Loop devices are attached with LOOP_CONFIGURE on the fd we validated (never by path:
losetup canonicalises /proc/self/fd/N back to a name) with LO_FLAGS_AUTOCLEAR: the device
detaches itself when its last user goes, i.e. at unmount, or at once if we die between
attaching and mounting. Nothing to leak.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence

from sifoverlay.engine.procs import mountinfo, process_alive
from sifoverlay.errors import ExternalToolError
from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)

FUSE_CONF = "/etc/fuse.conf"
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
_LOG_TAIL = 600

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CLR_FD = 0x4C01
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_info64 then struct loop_config (linux/loop.h), packed without padding.
_LOOP_INFO64 = "=5Q4I64s64s32s2Q"


def is_mounted(target: str) -> bool:
    return any(e.target == target for e in mountinfo())


def mounts_under(directory: str) -> list[str]:
    """Mount points at or below `directory`, deepest (latest) first."""
    prefix = directory.rstrip("/") + "/"
    found = [e.target for e in mountinfo() if e.target == directory or e.target.startswith(prefix)]
    return list(reversed(found))


def user_allow_other(conf: str | None = None) -> bool:
    """True when /etc/fuse.conf lets ordinary users mount with allow_other."""
    try:
        with open(conf or FUSE_CONF, encoding="utf-8", errors="replace") as fh:
            return any(line.strip() == "user_allow_other" for line in fh)
    except FileNotFoundError:
        return False


# --- FUSE ------------------------------------------------------------------------------------------
def spawn_fuse(
    argv: Sequence[str], target: str, *, uid: int | None, gid: int | None, pass_fds: Sequence[int] = (),
    log_path: str, umask: int = 0o022, timeout: float = MOUNT_TIMEOUT, image: str | None = None,
    what: str = "the filesystem", io: FileIO = REAL_IO,
) -> subprocess.Popen[bytes]:
    """Start a FUSE daemon in the foreground as uid/gid (None = as we are) and wait until
    `target` shows up in mountinfo. On failure the daemon is killed and reaped and
    ExternalToolError carries the tail of its output."""
    proc = start_fuse(argv, uid=uid, gid=gid, pass_fds=pass_fds, log_path=log_path, umask=umask, io=io)
    return wait_mounted(proc, target, log_path=log_path, timeout=timeout, image=image, what=what)


def start_fuse(
    argv: Sequence[str], *, uid: int | None, gid: int | None, pass_fds: Sequence[int] = (), log_path: str,
    umask: int = 0o022, io: FileIO = REAL_IO,
) -> subprocess.Popen[bytes]:
    """The first half of `spawn_fuse`: the daemon started, its mount not waited for (the
    runtime starts the daemons of independent mounts together, then waits for each)."""
    if os.geteuid() != 0:  # unprivileged exec: the daemons are ours already (fusermount3 mounts)
        uid = gid = None
    logf = io.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:  # the daemon keeps its own copy of the fd
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd="/",
            user=uid, group=gid, extra_groups=[] if uid is not None else None, pass_fds=tuple(pass_fds),
            start_new_session=True, umask=umask, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        )
    finally:
        io.close(logf)
    return proc


def wait_mounted(proc: subprocess.Popen[bytes], target: str, *, log_path: str, timeout: float = MOUNT_TIMEOUT,
                 image: str | None = None, what: str = "the filesystem") -> subprocess.Popen[bytes]:
    """The second half of `spawn_fuse`: wait until `target` is mounted; on failure the
    daemon is killed and reaped and ExternalToolError carries the tail of its output."""
    tool = os.path.basename(str(proc.args[0])) if isinstance(proc.args, (list, tuple)) else "fuse"
    deadline = time.monotonic() + timeout
    pause = 0.002  # a daemon mounts in 10-30 ms: short polls first (every job start waits here)
    while True:
        if is_mounted(target):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc.pid, None, proc=proc, grace=2.0)
            raise ExternalToolError(
                image or target, f"{tool} could not mount {what}: {read_tail(log_path) or 'no output'}",
                tool=tool, returncode=proc.returncode if proc.returncode is not None else -1,
                output_tail=read_tail(log_path),
            )
        time.sleep(pause)
        pause = min(pause * 1.5, 0.02)


def read_tail(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[-_LOG_TAIL:]


def stop_process(pid: int | None, start: int | None, *, proc: subprocess.Popen[bytes] | None = None,
                 grace: float = EXIT_TIMEOUT) -> bool:
    """Wait up to `grace` s for a daemon to exit by itself (it does after its unmount),
    then SIGTERM, then SIGKILL. True if it had to be signalled."""
    if not pid:
        return False
    deadline = time.monotonic() + grace
    signalled = False
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            if not _alive(pid, start, proc):
                break
            log.warning("FUSE daemon pid %d still running: sending %s", pid, sig.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            signalled = True
            deadline = time.monotonic() + 5.0
        while _alive(pid, start, proc) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _alive(pid, start, proc):
            break
    return signalled


def _alive(pid: int, start: int | None, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap if it is our child
    return process_alive(pid, start)


def unmount(target: str) -> None:
    """umount(2) the target; lazily when busy. Missing mounts are fine (idempotent)."""
    if not is_mounted(target):
        return
    # an ordinary user unmounts her FUSE mounts through the setuid fusermount3
    plain, lazily = (["umount"], ["umount", "-l"]) if os.geteuid() == 0 else (["fusermount3", "-u"], ["fusermount3", "-uz"])
    proc = subprocess.run([*plain, target], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and is_mounted(target):
        log.warning("umount %s failed (%s): detaching lazily", target, proc.stderr.strip())
        lazy = subprocess.run([*lazily, target], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if lazy.returncode != 0 and is_mounted(target):
            raise ExternalToolError(target, f"cannot unmount: {lazy.stderr.strip()}", tool="umount",
                                    returncode=lazy.returncode, output_tail=lazy.stderr.strip())


# --- kernel ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def loop_from_fd(fd: int, offset: int, size: int, *, readonly: bool, label: str) -> Iterator[str]:
    """Attach a loop device to [offset, offset+size) of the open file `fd` (autoclear) and
    yield its path; the device stays open until the block ends, so mount inside the block."""
    flags = _LO_FLAGS_AUTOCLEAR | (_LO_FLAGS_READ_ONLY if readonly else 0)
    info = struct.pack(_LOOP_INFO64, 0, 0, 0, offset, size, 0, 0, 0, flags, label.encode()[:63], b"", b"", 0, 0)
    config = struct.pack("=II", fd, 0) + info + bytes(64)
    for _ in range(20):  # another process may grab the free device between GET_FREE and CONFIGURE
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)  # io-seam: exempt (loop control device)
        try:
            number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
        finally:
            os.close(ctl)
        device = f"/dev/loop{number}"
        lfd = os.open(device, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)  # io-seam: exempt (loop device node, set up by ioctl)
        try:
            fcntl.ioctl(lfd, _LOOP_CONFIGURE, config)
        except OSError as exc:
            os.close(lfd)
            if exc.errno == errno.EBUSY:
                continue
            raise ExternalToolError(None, f"cannot attach a loop device: {exc.strerror}", tool="loop",
                                    returncode=exc.errno, output_tail="") from None
        try:
            yield device
        finally:
            os.close(lfd)  # autoclear: detaches now unless a mount holds it
        return
    raise ExternalToolError(None, "no free loop device", tool="loop", returncode=errno.EBUSY, output_tail="")


def detach_loop(device: str, image_st: tuple[int, int], offset: int) -> bool:
    """Detach `device` if it still serves our image at `offset` (autoclear normally did)."""
    name = os.path.basename(device)
    base = f"/sys/block/{name}/loop"
    try:
        with open(f"{base}/offset", encoding="ascii") as fh:
            lo_offset = int(fh.read().strip() or 0)
        with open(f"{base}/backing_file", encoding="utf-8", errors="replace") as fh:
            backing = fh.read().strip()
        st = os.stat(backing)
    except (OSError, ValueError):
        return False
    if (st.st_dev, st.st_ino) != image_st or lo_offset != offset:
        return False
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD)
    except OSError as exc:
        log.warning("cannot detach %s: %s", device, exc.strerror)
        return False
    finally:
        os.close(fd)
    return True


def kernel_mount(source: str, target: str, fstype: str, options: str) -> None:
    proc = subprocess.run(["mount", "-t", fstype, "-o", options, source, target], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExternalToolError(target, f"mount -t {fstype} failed: {proc.stderr.strip() or proc.stdout.strip()}",
                                tool="mount", returncode=proc.returncode, output_tail=proc.stderr.strip()[-_LOG_TAIL:])
