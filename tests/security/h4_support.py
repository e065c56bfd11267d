"""Helpers for H4's attack tests (findings 3, 4, 6, 9, exec): throw-away real users, tool
wrappers that record who ran them, a renameat2(RENAME_EXCHANGE) flipper."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pwd
import secrets
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealUser:
    name: str
    uid: int
    gid: int


@contextlib.contextmanager
def real_user(prefix: str = "sifsec") -> Iterator[RealUser]:
    """useradd a system user (no home); on exit kill its processes by pid and userdel."""
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield RealUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        found = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout.split()
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["userdel", name], check=False, capture_output=True)


WRAPPER = """#!/bin/sh
# records who runs {tool} (uid, no_new_privs, effective capabilities) and how, then runs it
{{ printf '%s\\t' "$(id -u)" "$(grep ^NoNewPrivs /proc/self/status | cut -f2)" \\
   "$(grep ^CapEff /proc/self/status | cut -f2)"; printf '%s ' "$0" "$@"; echo; }} >> {log}
exec {real} "$@"
"""


def tool_spies(directory: Path, *tools: str) -> Path:
    """Wrappers for `tools` in `directory` (prepend it to PATH); returns the log file,
    world-writable so that unprivileged runs can record themselves too."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    log = directory / "calls.log"
    log.touch()
    log.chmod(0o666)
    for tool in tools:
        real = next(p for p in ("/usr/sbin/" + tool, "/usr/bin/" + tool, "/sbin/" + tool, "/bin/" + tool)
                    if os.access(p, os.X_OK))
        wrapper = directory / tool
        wrapper.write_text(WRAPPER.format(tool=tool, log=log, real=real))
        wrapper.chmod(0o755)
    return log


@dataclass(frozen=True)
class Call:
    uid: int
    no_new_privs: int
    cap_eff: int
    argv: list[str]


def calls(log: Path) -> list[Call]:
    found = []
    for line in log.read_text().splitlines():
        uid, nnp, cap, argv = line.split("\t", 3)
        found.append(Call(int(uid), int(nnp or 0), int(cap or "0", 16), argv.split()))
    return found


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: str, b: str) -> None:
    """renameat2(a, b, RENAME_EXCHANGE): atomically swap two names."""
    if _libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def flipper_argv(a: str, b: str) -> list[str]:
    """A separate process swapping `a` and `b` in a tight loop until killed."""
    code = (
        "import ctypes,sys\n"
        "libc=ctypes.CDLL(None,use_errno=True)\n"
        "a,b=sys.argv[1].encode(),sys.argv[2].encode()\n"
        "while True: libc.renameat2(-100,a,-100,b,2)\n"
    )
    return ["python3", "-c", code, a, b]


def mode_owner(path: str) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this (test) process the subreaper of everything it starts: the orphans of a
    SIGKILLed child come to us and are reaped here (the sandbox's pid 1 does not reap)."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        reap()
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap() -> None:
    """Collect every exited child (zombie) of this process without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def live_processes(uid: int) -> list[str]:
    """`pid comm` of uid's processes that are not zombies."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "-u", str(uid)], capture_output=True, text=True).stdout
    return [f"{line.split()[0]} {line.split()[2]}" for line in out.splitlines()
            if len(line.split()) >= 3 and not line.split()[1].startswith("Z")]
