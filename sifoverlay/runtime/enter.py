"""Child side of `exec_in`: run as ``python -m sifoverlay.runtime.enter SPEC_JSON``, as root
- or, for an unprivileged exec, as the user in a new user namespace mapping only her
own uid/gid (so nobody needs sudo: docs/security.md).

In a private mount namespace (nothing propagates back to the host) and a new pid
namespace: pid 1 there mounts /proc, binds /dev and /sys and the user's binds into the
rootfs, chroots into it, starts the command as pid 2 (dropped to the job user, cwd kept
when it exists in the image) and then waits as the job user, forwarding SIGTERM/SIGHUP.
When pid 1 exits the kernel kills whatever is left in the namespace; every link of the
chain dies with its parent (PR_SET_PDEATHSIG), so a SIGKILLed `sifoverlay exec` leaves no
process of the job behind - only mounts and FUSE daemons, which `sifoverlay recover`
tears down (runtime.reclaim).

The rootfs content is user-controlled (and served by the user's FUSE daemons), so every
destination inside it is resolved with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS):
a symlink in the image resolves inside the rootfs, never to a host path, and a symlink
loop is a clean ELOOP. The mount then targets the resolved fd (/proc/self/fd/N).

Setup failures are reported on the status fd (closed on a successful exec) so the parent
can tell "could not start" from the command's own exit code.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import struct
import sys
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded (find_library forks ldconfig)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
SYS_OPENAT2 = 437  # same number on every architecture (new syscall table)
O_PATH = 0o10000000
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
CLONE_NEWUSER = 0x10000000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
# statvfs f_flag bit -> mount flag, for the flags a user namespace locks on a bind mount
_LOCKABLE = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
EXIT_SETUP = 125  # like `env`/`chroot`: the command never started


class SetupError(Exception):
    """A step before exec failed; the message is one line for the user."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _bytes(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str, data: str | None = None) -> None:
    _check(_libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)), what)


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
            # keep the flags the source mount already has: in a user namespace they are
            # locked, and a remount that drops one is refused (EPERM)
            have = os.statvfs(f"/proc/self/fd/{fd}").f_flag
            locked = sum(ms for st, ms in _LOCKABLE if have & st)
            _mount(None, f"/proc/self/fd/{fd}", None,
                   MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & (MS_NOSUID | MS_NODEV)) | locked,
                   f"{what} read-only on {dest}")
        finally:
            os.close(fd)


def _filtered_dev(root_fd: int, source: str, hidden: set[str]) -> None:
    """The image's /dev as a fresh tmpfs holding a bind of every entry of the host's
    `source` but the `hidden` ones (GPUs not allocated to the job: runtime.gpu), then
    made read-only. Each node keeps its own mount's flags, so the devices work even where
    the tmpfs is nodev (a user namespace); nothing of it reaches the overlay."""
    try:
        fd = resolve_in_root(root_fd, "/dev", "mounting /dev: destination")
    except SetupError:
        return  # the image has no /dev: run without it, as for the whole-/dev bind
    try:
        _mount("tmpfs", f"/proc/self/fd/{fd}", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mounting a tmpfs on /dev",
               "mode=755,size=64k")
    finally:
        os.close(fd)
    dev_fd = resolve_in_root(root_fd, "/dev", "mounting /dev: destination")  # the tmpfs now
    try:
        for entry in sorted(os.scandir(source), key=lambda e: e.name):
            if entry.name in hidden:
                continue
            host = os.path.join(source, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(host), entry.name, dir_fd=dev_fd)  # io-seam: exempt (the job's own /dev tmpfs)
                continue
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(entry.name, 0o755, dir_fd=dev_fd)  # io-seam: exempt (the job's own /dev tmpfs)
            else:
                os.close(os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,  # io-seam: exempt (the job's own /dev tmpfs)
                                 dir_fd=dev_fd))
            target = os.open(entry.name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dev_fd)
            try:
                _mount(host, f"/proc/self/fd/{target}", None, MS_BIND | MS_REC, f"binding {host} on /dev")
            finally:
                os.close(target)
        _mount(None, f"/proc/self/fd/{dev_fd}", None,
               MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "making /dev read-only")
    finally:
        os.close(dev_fd)


def _die_with_parent(sig: int = 9) -> None:
    """PR_SET_PDEATHSIG: this process gets SIGKILL when its parent thread exits."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "parent death signal")


def _drop(spec: dict[str, Any]) -> None:
    if not spec.get("userns"):  # (in our own user namespace setgroups is denied: nothing to drop)
        os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def setup_namespaces(userns: bool) -> None:
    """A private mount namespace and a new pid namespace for our next child; `userns`
    (unprivileged exec): inside a new user namespace that maps only our own uid and gid
    to themselves - the capabilities it gives us reach no further than our own mounts."""
    if not userns:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare(CLONE_NEWNS|CLONE_NEWPID)")
    else:
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID),
               "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID) (unprivileged user namespaces disabled?)")
        for name, text in (("uid_map", f"{uid} {uid} 1\n"), ("setgroups", "deny\n"), ("gid_map", f"{gid} {gid} 1\n")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)  # io-seam: exempt (namespace id map)
            try:
                os.write(fd, text.encode())  # io-seam: exempt (namespace id map)
            finally:
                os.close(fd)
    _mount(None, "/", None, MS_REC | MS_PRIVATE, "making mounts private")


def setup_root(spec: dict[str, Any]) -> None:
    """(pid 1 of the new pid namespace) mount /proc, /dev, /sys and the binds, chroot."""
    root_fd = os.open(spec["rootfs"], O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _mount_into(root_fd, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mounting proc",
                    required=False)
    except SetupError:
        if not spec.get("userns"):
            raise
        # a user namespace may mount proc only where the host's is fully visible: bind it
        _mount_into(root_fd, "/proc", "/proc", None, MS_BIND | MS_REC, "binding /proc", required=False)
    dev = spec.get("dev") or {"source": "/dev", "hidden": []}
    if dev["hidden"]:
        _filtered_dev(root_fd, dev["source"], set(dev["hidden"]))
    else:
        _mount_into(root_fd, dev["source"], "/dev", None, MS_BIND | MS_REC, "binding /dev", required=False)
    _mount_into(root_fd, "/sys", "/sys", None, MS_BIND | MS_REC, "binding /sys", required=False)
    for source, dest, readonly in spec["binds"]:
        _mount_into(root_fd, source, dest, None, MS_BIND | MS_REC | MS_NOSUID | MS_NODEV, f"bind {source}",
                    required=True, readonly=readonly)
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)


def exec_command(spec: dict[str, Any]) -> None:
    """(pid 2) become the job user and exec the command."""
    # From here until setuid only syscalls: nothing may be imported while root sits inside
    # the user-controlled tree (an import would load the image's files as root).
    _drop(spec)
    _enter_workdir(spec)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except FileNotFoundError:
        raise SetupError(f"{argv[0]}: command not found in the image") from None
    except OSError as exc:
        raise SetupError(f"{argv[0]}: cannot execute: {exc.strerror}") from None


def _enter_workdir(spec: dict[str, Any]) -> None:
    """(as the job user) the first of spec["cwd"] that exists inside; when that is not the
    first one, one warning line on stderr; spec["cwd_required"]: the first or nothing."""
    wanted = spec["cwd"] if isinstance(spec["cwd"], list) else [spec["cwd"] or "/"]
    for number, directory in enumerate([*wanted, "/"]):
        try:
            os.chdir(directory)
        except OSError as exc:
            if number == 0 and spec.get("cwd_required"):
                raise SetupError(f"working directory {directory}: {exc.strerror} in the image") from None
            continue
        if number > 0:
            os.write(2, f"sifoverlay: warning: {wanted[0]} does not exist in the image: "  # io-seam: exempt (stderr)
                        f"working directory is {directory}\n".encode(errors="replace"))
        return


def _report(status_fd: int, exc: BaseException) -> int:
    message = str(exc) if isinstance(exc, SetupError) else (
        f"{exc.strerror}: {exc.filename or ''}".rstrip(": ") if isinstance(exc, OSError) else type(exc).__name__)
    os.write(status_fd, message.encode(errors="replace")[:4000])  # io-seam: exempt (status pipe to the parent)
    return 127 if "command not found" in message else EXIT_SETUP


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _wait_forwarding(child: int, *, reap_all: bool) -> int:
    """Forward SIGTERM/SIGHUP to `child` (SIGINT comes from the terminal to the whole
    process group: ignored here), wait for it (reaping any orphan as pid 1 must) and
    return its exit code (128+N when killed by signal N)."""
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # what came while blocked is forwarded now
    while True:
        pid, status = os.waitpid(-1 if reap_all else child, 0)
        if pid == child:
            return _exit_code(status)


def init_main(spec: dict[str, Any], status_fd: int) -> int:
    """pid 1 of the job's pid namespace: set the root up, start the command as pid 2,
    then wait as the job user. When pid 1 exits the kernel kills everything left in the
    namespace, so nothing the command started outlives it (or a SIGKILLed `exec`: pid 1
    dies with its parent, PR_SET_PDEATHSIG)."""
    try:
        _die_with_parent()
        setup_root(spec)
        child = os.fork()
        if child == 0:
            try:
                # nothing here ever installed a handler for them: held ones now end the command
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                exec_command(spec)
            except BaseException as exc:  # noqa: BLE001 - reported, never re-raised as root in the chroot
                os._exit(_report(status_fd, exc))
        os.close(status_fd)
        _drop(spec)
        _die_with_parent()  # changing credentials cleared it
        return _wait_forwarding(child, reap_all=True)
    except BaseException as exc:  # noqa: BLE001
        try:
            return _report(status_fd, exc)
        except BaseException:  # noqa: BLE001
            return EXIT_SETUP


def main() -> int:
    spec = json.loads(sys.argv[1])
    status_fd = int(spec["status_fd"])
    os.set_inheritable(status_fd, False)  # closed by a successful exec: EOF = started
    # SIGTERM/SIGHUP are blocked (kept pending) until someone forwards them: pid 1 of the
    # new pid namespace drops a signal it has no handler for, so one sent while the root is
    # set up would be lost and the command would run to its end.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        _die_with_parent()  # a SIGKILLed `sifoverlay exec` takes us (and so the whole job) along
        if spec.get("parent") and os.getppid() != int(spec["parent"]):
            return EXIT_SETUP  # it already died
        setup_namespaces(bool(spec.get("userns")))
        pid = os.fork()
    except (SetupError, OSError) as exc:
        return _report(status_fd, exc)
    if pid == 0:
        os._exit(init_main(spec, status_fd))
    os.close(status_fd)
    return _wait_forwarding(pid, reap_all=False)


if __name__ == "__main__":
    sys.exit(main())
