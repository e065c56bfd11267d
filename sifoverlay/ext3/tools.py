"""Running e2fsprogs/util-linux tools and attaching loop devices at an offset.

Every tool runs with stdin=/dev/null (e2fsck and mkfs may otherwise prompt) and captured
output; a failure raises ExternalToolError(tool, returncode, output_tail).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence

from sifoverlay.errors import ExternalToolError

log = logging.getLogger(__name__)

TAIL_LINES = 8
TAIL_CHARS = 600


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


def detach_loop(device: str) -> None:
    """Detach a loop device (retried briefly: udev may still hold it just after use)."""
    for attempt in range(_ATTACH_TRIES):
        try:
            run_tool(["losetup", "--detach", device], path=device, timeout=60)
            return
        except ExternalToolError:
            if attempt == _ATTACH_TRIES - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


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
