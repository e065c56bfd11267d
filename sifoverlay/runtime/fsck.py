"""e2fsck of the ext3 overlay through a loop device bound to the validated fd.

sifoverlay.ext3.replay_and_fsck works by path (losetup canonicalises even /proc/self/fd/N
back to a name), which a user who can rename files beside their image could redirect
between validation and the check - with e2fsck running as root. The runtime therefore
binds the loop device to its own fd (mounts.loop_from_fd) and runs e2fsck on that device:
`-p` to replay the journal and repair before a rw mount, `-fn` (read-only) as the
userspace gate in front of a kernel mount.
"""

from __future__ import annotations

import logging
import subprocess

from sifoverlay.errors import Ext3FormatError, ExternalToolError

from . import mounts

log = logging.getLogger(__name__)

# e2fsck exit bits: 1 errors corrected, 2 corrected (reboot), 4 left uncorrected,
# 8 operational error, 16 usage, 32 cancelled, 128 shared library error.
_REPAIRED_OK = 0x1 | 0x2
FSCK_TIMEOUT = 600


def fsck_region(image: str, fd: int, offset: int, size: int, *, repair: bool) -> int:
    """Run e2fsck on [offset, offset+size) of `fd`; returns its exit code when acceptable.
    repair=True: `e2fsck -p` (journal replay + safe fixes, writes the image);
    repair=False: `e2fsck -fn` (reads only) and any finding is a refusal."""
    argv = ["e2fsck", "-p"] if repair else ["e2fsck", "-f", "-n"]
    with mounts.loop_from_fd(fd, offset, size, readonly=not repair, label="sifoverlay:fsck") as device:
        if not repair:
            # e2fsck silently falls back to a backup superblock (and exits 0); the kernel
            # would read the primary. dumpe2fs opens only the primary: it must be sound.
            rc, tail = _run(image, ["dumpe2fs", "-h", device])
            if rc != 0:
                raise Ext3FormatError(image, f"ext3 overlay at offset {offset}: primary superblock unusable: {tail}",
                                      tool="dumpe2fs", returncode=rc, output_tail=tail)
        rc, tail = _run(image, [*argv, device])
    acceptable = (rc & ~_REPAIRED_OK) == 0 if repair else rc == 0
    if not acceptable:
        what = "repair" if repair else "read-only check"
        raise Ext3FormatError(image, f"ext3 overlay at offset {offset} failed e2fsck {what} (exit {rc}): {tail}",
                              tool="e2fsck", returncode=rc, output_tail=tail)
    log.info("%s: e2fsck %s of the ext3 overlay: exit %d", image, "-p" if repair else "-fn", rc)
    return rc


def _run(image: str, argv: list[str]) -> tuple[int, str]:
    tool = argv[0]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=FSCK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ExternalToolError(image, f"{tool} of the ext3 overlay timed out after {FSCK_TIMEOUT} s",
                                tool=tool, returncode=-1, output_tail="") from None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip() and not line.startswith(("e2fsck 1.", "dumpe2fs 1."))]
    if argv[:2] == ["dumpe2fs", "-h"] and proc.returncode == 0:
        return 0, ""
    return proc.returncode, " | ".join(lines)[-600:]
