"""Child side of `exec_in`: run as ``python -m sifoverlay.runtime.enter SPEC_JSON``, as root.

In a private mount namespace (nothing propagates back to the host): mount /proc, bind
/dev and /sys and the user's binds into the rootfs, chroot into it, drop to the job
user, keep the cwd when it exists in the image, and exec the command.

The rootfs content is user-controlled (and served by the user's FUSE daemons), so every
destination inside it is resolved with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS):
a symlink in the image resolves inside the rootfs, never to a host path, and a symlink
loop is a clean ELOOP. The mount then targets the resolved fd (/proc/self/fd/N).

Setup failures are reported on the status fd (closed on a successful exec) so the parent
can tell "could not start" from the command's own exit code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import struct
import sys
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38
SYS_OPENAT2 = 437  # same number on every architecture (new syscall table)
O_PATH = 0o10000000
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
EXIT_SETUP = 125  # like `env`/`chroot`: the command never started


class SetupError(Exception):
    """A step before exec failed; the message is one line for the user."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _bytes(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    _check(_libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, None), what)


def resolve_in_root(root_fd: int, path: str, what: str) -> int:
    """O_PATH fd of `path` resolved inside the tree `root_fd` (symlinks stay inside)."""
    how = struct.pack("=QQQ", O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(SYS_OPENAT2, root_fd, path.encode(), how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        hint = " (symlink loop in the image)" if err == errno.ELOOP else ""
        raise SetupError(f"{what} {path}: {os.strerror(err)}{hint}")
    return int(fd)


def _mount_into(root_fd: int, source: str | None, dest: str, fstype: str | None, flags: int, what: str, *,
                required: bool, readonly: bool = False) -> None:
    try:
        fd = resolve_in_root(root_fd, dest, f"{what}: destination")
    except SetupError:
        if required:
            raise
        return  # the image has no such directory: run without it, as SingularityCE does
    try:
        _mount(source, f"/proc/self/fd/{fd}", fstype, flags, f"{what} on {dest}")
    finally:
        os.close(fd)
    if readonly:  # the remount must name the new mount's root: resolve the destination again
        fd = resolve_in_root(root_fd, dest, f"{what}: destination")
        try:
            _mount(None, f"/proc/self/fd/{fd}", None, MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & (MS_NOSUID | MS_NODEV)),
                   f"{what} read-only on {dest}")
        finally:
            os.close(fd)


def setup_and_exec(spec: dict[str, Any]) -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, "making mounts private")
    root_fd = os.open(spec["rootfs"], O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _mount_into(root_fd, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mounting proc", required=False)
    _mount_into(root_fd, "/dev", "/dev", None, MS_BIND | MS_REC, "binding /dev", required=False)
    _mount_into(root_fd, "/sys", "/sys", None, MS_BIND | MS_REC, "binding /sys", required=False)
    for source, dest, readonly in spec["binds"]:
        _mount_into(root_fd, source, dest, None, MS_BIND | MS_REC | MS_NOSUID | MS_NODEV, f"bind {source}",
                    required=True, readonly=readonly)
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)
    # From here until setuid only syscalls: nothing may be imported while root sits inside
    # the user-controlled tree (an import would load the image's files as root).
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    try:
        os.chdir(spec["cwd"] or "/")
    except OSError:
        os.chdir("/")
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except FileNotFoundError:
        raise SetupError(f"{argv[0]}: command not found in the image") from None
    except OSError as exc:
        raise SetupError(f"{argv[0]}: cannot execute: {exc.strerror}") from None


def main() -> int:
    spec = json.loads(sys.argv[1])
    status_fd = int(spec["status_fd"])
    os.set_inheritable(status_fd, False)  # closed by a successful exec: EOF = started
    try:
        setup_and_exec(spec)
    except (SetupError, OSError) as exc:
        message = str(exc) if isinstance(exc, SetupError) else f"{exc.strerror}: {exc.filename or ''}".rstrip(": ")
        os.write(status_fd, message.encode(errors="replace")[:4000])  # io-seam: exempt (status pipe to the parent)
        return 127 if "command not found" in message else EXIT_SETUP
    return EXIT_SETUP  # not reached: exec replaced us


if __name__ == "__main__":
    sys.exit(main())
