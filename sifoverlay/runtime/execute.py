"""Run a command inside an assembled rootfs (parent side; see `enter` for the child).

`exec_in` starts ``python -m sifoverlay.runtime.enter`` as root; it enters a private
mount namespace, mounts /proc, /dev, /sys and the binds into the rootfs, chroots, drops
to the job user and execs the command. SIGINT/SIGTERM/SIGHUP received by the caller are
forwarded to the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

from sifoverlay.errors import SifOverlayError, UsageError

from .assemble import Rootfs
from .gpu import DeviceView
from .jobview import Bind

log = logging.getLogger(__name__)

# what signal.signal() returns and accepts back
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)  # SIGINT: the terminal already sends it to the child


_held: list[int] = []  # signals received inside hold_signals() and not yet answered


@contextlib.contextmanager
def hold_signals() -> Iterator[None]:
    """While a run is set up and torn down, SIGTERM/SIGHUP are held instead of killing
    the caller half way (mounts, lease and session left behind): `exec_in` then does not
    start the command (exit 128+N), or forwards them to it once it runs. Outside the main
    thread signals cannot be caught: nothing changes there."""
    def hold(signum: int, _frame: FrameType | None) -> None:
        _held.append(signum)

    previous: dict[int, _Handler] = {}
    try:
        for sig in _FORWARDED:
            previous[sig] = signal.signal(sig, hold)
    except ValueError:
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _held:
            log.info("held %s answered by the run's end", ", ".join(signal.Signals(s).name for s in _held))
        _held.clear()


class StartError(SifOverlayError):
    """The command could not be started inside the image (bad bind, not found...)."""

    def __init__(self, path: str | None, problem: str, *, returncode: int) -> None:
        super().__init__(path, problem, returncode=returncode)
        self.exit_code = returncode


def exec_in(
    rootfs: Rootfs, argv: Sequence[str], *, uid: int, gid: int, groups: Sequence[int] | None = None,
    binds: Sequence[Bind] = (), cwd: str | Sequence[str] | None = None, env: Mapping[str, str] | None = None,
    cwd_required: bool = False, dev: DeviceView = DeviceView(),
) -> int:
    """Run argv inside `rootfs` as uid/gid; return its exit status (128+N for signal N).
    `cwd`: a directory, or candidates tried in order (a fallback warns on stderr; see
    runtime.environment). `dev`: the host device directory bound on /dev and the entries
    of it to leave out (GPUs not allocated: runtime.gpu). Raises StartError (exit 125, or 127 for a missing command)
    when it never started."""
    if not argv:
        raise UsageError(None, "no command given")
    if _held:  # terminated while the run was set up: never start the command
        raise StartError(rootfs.image, f"{signal.Signals(_held[0]).name} received before the command started",
                         returncode=128 + _held[0])
    read_end, write_end = os.pipe()
    spec = {
        "rootfs": rootfs.path, "argv": list(argv), "uid": uid, "gid": gid,
        "groups": list(groups) if groups is not None else [gid], "cwd": [cwd or "/"] if cwd is None or isinstance(cwd, str) else list(cwd),
        "cwd_required": cwd_required,
        "binds": [[b.source, b.dest, b.readonly] for b in binds],
        "dev": {"source": dev.source, "hidden": list(dev.hidden)},
        "env": dict(os.environ if env is None else env), "status_fd": write_end, "parent": os.getpid(),
        "userns": os.geteuid() != 0,
    }
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sifoverlay.runtime.enter", json.dumps(spec)],
                                pass_fds=(write_end,), cwd="/")
    finally:
        os.close(write_end)
    previous = _forward_signals(proc)
    for sig in _held:  # arrived between the check above and the forwarding
        proc.send_signal(sig)
    try:
        with os.fdopen(read_end, "rb") as status:
            failure = status.read().decode(errors="replace")
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise StartError(rootfs.image, failure, returncode=returncode if returncode > 0 else 125)
    return 128 - returncode if returncode < 0 else returncode


def _forward_signals(proc: subprocess.Popen[bytes]) -> dict[int, _Handler]:
    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous: dict[int, _Handler] = {}
    try:
        for sig in _FORWARDED:
            previous[sig] = signal.signal(sig, forward)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        pass
    return previous
