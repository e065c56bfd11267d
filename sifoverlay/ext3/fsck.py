"""Replay the journal of, and repair, an ext3 filesystem embedded at an offset.

e2fsprogs 1.47.0 cannot replay a journal through `file?offset=N` (it replays, then fails
to re-open the file without the offset, exits 12 and leaves needs_recovery set), and
fuse2fs -o offset= has the same bug. So a dirty region is attached to a loop device
with `losetup --offset --sizelimit` and checked there (test-stack-lowlevel §2.4).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

from sifoverlay.errors import Ext3FormatError, ExternalToolError, ImageBusy, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .superblock import Superblock
from .tools import loop_binding, loop_device, output_tail, run_tool, serves

log = logging.getLogger(__name__)

# e2fsck exit bits: 1 = errors corrected, 2 = corrected, reboot advised (root fs only);
# 4 = errors left uncorrected, 8 = operational error, 16 usage, 32 cancelled, 128 library.
_FSCK_OK_BITS = 0x1 | 0x2


@dataclass(frozen=True, slots=True)
class FsckResult:
    """What replay_and_fsck did. `checked` is False when the superblock was clean."""

    replayed: bool
    fixed: bool
    returncode: int
    output_tail: str
    checked: bool = True


def _loop_devices_on(path: str, offset: int) -> list[str]:
    """Loop devices already backed by `path` at `offset` (someone may have it mounted)."""
    proc = run_tool(["losetup", "--associated", path, "--offset", str(offset)], path=path, timeout=60)
    return [line.split(":", 1)[0] for line in proc.stdout.splitlines() if line.startswith("/dev/")]


def replay_and_fsck(
    path: str | os.PathLike[str],
    offset: int,
    size: int,
    *,
    fd: int | None = None,
    force: bool = False,
    check_only: bool = False,
    io: FileIO = REAL_IO,
) -> FsckResult:
    """Make the ext3 at [offset, offset+size) of `path` clean, replaying its journal.

    When the superblock is clean and needs no recovery (and not `force`), nothing runs.
    Otherwise: loop device over the range, `e2fsck -p` (plus -f with `force`), detach.
    Exit codes 0/1 (and 2) are success; anything else raises ExternalToolError, as does
    a filesystem still dirty afterwards. Refuses (ImageBusy) when a loop device already
    backs that range, because checking a mounted filesystem would corrupt it.

    losetup attaches by name; the device is then verified (LOOP_GET_STATUS64) to serve
    the same inode as `fd` (or as `path` when this call began) at the same offset and
    size, so a file swapped in between is never checked (OverlayStateError).

    `check_only`: the gate in front of a kernel mount (runtime): always runs, on a
    read-only loop device, `dumpe2fs -h` (e2fsck would silently fall back to a backup
    superblock; the kernel reads the primary) then `e2fsck -f -n`; any finding raises
    Ext3FormatError; nothing is written, so a mounted range is not refused.
    """
    if check_only:
        return _check_read_only(os.fspath(path), offset, size, fd)
    target = os.fspath(path)
    source: int | str = fd if fd is not None else target
    expected = os.fstat(fd) if fd is not None else os.stat(target)
    before = Superblock.read(source, offset, size=size)
    if not before.is_dirty and not force:
        return FsckResult(replayed=False, fixed=False, returncode=0, output_tail="", checked=False)
    busy = _loop_devices_on(target, offset)
    if busy:
        raise ImageBusy(
            target,
            f"ext3 at offset {offset} is attached to {', '.join(busy)} (mounted?); refusing to fsck it",
            holder=", ".join(busy),
        )
    log.info(
        "checking ext3 at %s offset %d (needs_recovery=%s, state=0x%x)",
        target, offset, before.needs_recovery, before.state,
    )
    argv = ["e2fsck", "-p"] + (["-f"] if force else [])

    def check_on_loop() -> subprocess.CompletedProcess[str]:
        with loop_device(target, offset, size) as device:
            if not serves(loop_binding(device), expected, offset, size):
                raise OverlayStateError(
                    target, "file replaced while preparing its fsck (another inode got attached); refusing to check it"
                )
            return run_tool([*argv, device], path=target, ok=range(0, 256))

    proc = io.external("e2fsck", [target], check_on_loop)  # one opaque op to crash tests
    rc = proc.returncode
    tail = output_tail(proc.stdout)
    if rc & ~_FSCK_OK_BITS:
        raise ExternalToolError(
            target,
            f"e2fsck failed on the ext3 at offset {offset} with exit code {rc}: {tail or '(no output)'}",
            tool="e2fsck",
            returncode=rc,
            output_tail=tail,
        )
    if fd is not None:
        io.fsync(fd)  # the loop driver wrote through the page cache of the backing file
    else:
        own = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            io.fsync(own)
        finally:
            io.close(own)
    after = Superblock.read(source, offset, size=size)
    if after.is_dirty:
        raise ExternalToolError(
            target,
            f"e2fsck exited {rc} but the ext3 at offset {offset} is still dirty "
            f"(needs_recovery={after.needs_recovery}, state=0x{after.state:x})",
            tool="e2fsck",
            returncode=rc,
            output_tail=tail,
        )
    result = FsckResult(
        replayed=before.needs_recovery and not after.needs_recovery,
        fixed=bool(rc & _FSCK_OK_BITS),
        returncode=rc,
        output_tail=tail,
    )
    log.info("e2fsck on %s offset %d: %s", target, offset, result)
    return result


def _check_read_only(target: str, offset: int, size: int, fd: int | None) -> FsckResult:
    expected = os.fstat(fd) if fd is not None else os.stat(target)
    with loop_device(target, offset, size, read_only=True) as device:
        if not serves(loop_binding(device), expected, offset, size):
            raise OverlayStateError(
                target, "file replaced while preparing its fsck (another inode got attached); refusing to check it"
            )
        probe = run_tool(["dumpe2fs", "-h", device], path=target, ok=range(0, 256))
        if probe.returncode != 0:
            raise Ext3FormatError(
                target, f"ext3 overlay at offset {offset}: primary superblock unusable: {_findings(probe.stdout)}",
                tool="dumpe2fs", returncode=probe.returncode, output_tail=_findings(probe.stdout),
            )
        proc = run_tool(["e2fsck", "-f", "-n", device], path=target, ok=range(0, 256))
    tail = _findings(proc.stdout)
    if proc.returncode != 0:
        raise Ext3FormatError(
            target, f"ext3 overlay at offset {offset} failed e2fsck read-only check (exit {proc.returncode}): {tail}",
            tool="e2fsck", returncode=proc.returncode, output_tail=tail,
        )
    log.info("e2fsck -fn on %s offset %d: clean", target, offset)
    return FsckResult(replayed=False, fixed=False, returncode=0, output_tail=tail)


def _findings(output: str) -> str:
    """A tool's output without its version banner (``e2fsck 1.47.0 (5-Feb-2023)``)."""
    return output_tail("\n".join(line for line in output.splitlines() if not line.startswith(("e2fsck 1.", "dumpe2fs 1."))))
