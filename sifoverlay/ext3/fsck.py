"""Replay the journal of, and repair, an ext3 filesystem embedded at an offset - as an
unprivileged process, never through a loop device (docs/security.md, finding 4).

The ext3 bytes are the user's: root must not feed them to the kernel (loop device, udev
and blkid probing it) or to a root e2fsck. So the check runs in a child process that
holds no privilege at all - the job user when the caller names one, else the image's
owner, else `nobody` (setpriv: uid/gid/groups switched, every capability and the bounding
set dropped, no_new_privs) - and gets exactly one descriptor of the image:

  1. it copies [offset, offset+size) into an unnamed temporary file (O_TMPFILE in a
     scratch directory; copy_file_range, holes skipped, so a sparse overlay costs only its
     data) - the copy is bounded by the region, whatever the superblock claims;
  2. runs ``e2fsck -p`` on that file (e2fsprogs 1.47.0 cannot replay a journal through
     ``file?offset=N``: it replays, then re-opens the file without the offset and exits
     12 with needs_recovery still set; fuse2fs -o offset= has the same bug);
  3. writes back, inside the region only, the chunks that differ: the ordinary blocks
     first, then any block holding a jbd2 journal superblock, then the ext3 superblock,
     with an fsync after each step - a crash in between leaves needs_recovery set and the
     journal intact or already replayed into the home blocks, so the next run redoes it.

Root only reads the primary superblock (fixed-size, bounds-checked parse) before and after.
The read-only gate in front of a kernel mount (`check_only`, mount=kernel chosen by the
admin) runs ``dumpe2fs -h`` and ``e2fsck -f -n`` the same way, on ``/proc/self/fd/N?offset=``
(read-only: no journal replay, so the offset bug does not matter).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from sifoverlay.errors import Ext3FormatError, ExternalToolError, ImageBusy, OverlayStateError
from sifoverlay.fsio import REAL_IO, FileIO

from .resize import data_extents as _data_extents
from .superblock import Superblock
from . import tools
from .tools import loops_backed_by, output_tail, unprivileged_argv

log = logging.getLogger(__name__)

# e2fsck exit bits: 1 = errors corrected, 2 = corrected, reboot advised (root fs only);
# 4 = errors left uncorrected, 8 = operational error, 16 usage, 32 cancelled, 128 library.
_FSCK_OK_BITS = 0x1 | 0x2
NOBODY = (65534, 65534)
DEFAULT_SCRATCH_DIR = "/var/tmp"
DEFAULT_TIMEOUT = 1800.0
_CHUNK = 1 << 20
_JBD2_MAGIC = bytes.fromhex("c03b3998")
_JBD2_SUPERBLOCK_TYPES = (3, 4)  # JBD2_SUPERBLOCK_V1 / _V2 (big-endian h_blocktype)


@dataclass(frozen=True, slots=True)
class FsckResult:
    """What replay_and_fsck did. `checked` is False when the superblock was clean."""

    replayed: bool
    fixed: bool
    returncode: int
    output_tail: str
    checked: bool = True


def fsck_identity(st: os.stat_result, as_user: tuple[int, int] | None) -> tuple[int, int] | None:
    """Who runs the check: None = ourselves (we are not root: nothing to drop). As root:
    `as_user` (the job user), else the image's owner, else nobody - never uid 0."""
    if os.geteuid() != 0:
        return None
    uid, gid = as_user if as_user is not None else (st.st_uid, st.st_gid)
    return (uid, gid) if uid != 0 else NOBODY


def replay_and_fsck(
    path: str | os.PathLike[str],
    offset: int,
    size: int,
    *,
    fd: int | None = None,
    force: bool = False,
    check_only: bool = False,
    as_user: tuple[int, int] | None = None,
    scratch_dir: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    io: FileIO = REAL_IO,
) -> FsckResult:
    """Make the ext3 at [offset, offset+size) of `path` clean, replaying its journal.

    When the superblock is clean and needs no recovery (and not `force`), nothing runs.
    Otherwise an unprivileged child (see the module docstring; `as_user` = (uid, gid) of
    the job user) checks a private copy with ``e2fsck -p`` (plus -f with `force`) and
    writes the repaired blocks back through the descriptor it was given. Exit codes 0/1
    (and 2) are success; anything else raises ExternalToolError, as does a filesystem
    still dirty afterwards. Refuses (ImageBusy) when a loop device backs that range.

    `fd`: the caller's authorized descriptor of the image (else `path` is opened with
    O_NOFOLLOW); nothing is ever reopened by name. `check_only`: the gate in front of a
    kernel mount: ``dumpe2fs -h`` (e2fsck would silently fall back to a backup superblock;
    the kernel reads the primary) then ``e2fsck -f -n``; any finding raises
    Ext3FormatError; nothing is written.
    """
    target = os.fspath(path)
    own = fd is None
    image_fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) if fd is None else fd
    try:
        st = os.fstat(image_fd)
        if check_only:
            return _check_read_only(target, image_fd, st, offset, size, as_user, timeout)
        before = Superblock.read(image_fd, offset, size=size)
        if not before.is_dirty and not force:
            return FsckResult(replayed=False, fixed=False, returncode=0, output_tail="", checked=False)
        busy = loops_backed_by(st, offset, size)
        if busy:
            raise ImageBusy(
                target,
                f"ext3 at offset {offset} is attached to {', '.join(busy)} (mounted?); refusing to fsck it",
                holder=", ".join(busy),
            )
        log.info(
            "checking ext3 at %s offset %d (needs_recovery=%s, state=0x%x) as an unprivileged process",
            target, offset, before.needs_recovery, before.state,
        )
        spec = {"offset": offset, "size": size, "force": force, "block_size": before.block_size,
                "scratch_dir": scratch_dir or DEFAULT_SCRATCH_DIR}
        report = io.external("e2fsck", [target], lambda: _run_child(target, image_fd, st, spec, as_user, timeout))
        rc = int(report.get("returncode", -1))
        tail = str(report.get("output_tail", ""))
        if "error" in report:
            raise ExternalToolError(target, f"fsck of the ext3 at offset {offset} failed: {report['error']}",
                                    tool="e2fsck", returncode=rc, output_tail=tail)
        if rc & ~_FSCK_OK_BITS:
            raise ExternalToolError(
                target,
                f"e2fsck failed on the ext3 at offset {offset} with exit code {rc}: {tail or '(no output)'}",
                tool="e2fsck",
                returncode=rc,
                output_tail=tail,
            )
        after = Superblock.read(image_fd, offset, size=size)
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
        log.info("e2fsck on %s offset %d: %s (%d bytes written back)", target, offset, result,
                 int(report.get("written", 0)))
        return result
    finally:
        if own:
            os.close(image_fd)


def _child_fd(image_fd: int, writable: bool) -> int:
    """The one descriptor the child gets: the same inode, opened again through our fd
    (never by name). Not root: the open is checked against our own rights."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    return os.open(f"/proc/self/fd/{image_fd}", flags)  # io-seam: exempt (reopen of an authorized fd)


def _spawn(argv: list[str], st: os.stat_result, as_user: tuple[int, int] | None, pass_fds: tuple[int, ...],
           timeout: float, path: str, tool: str) -> subprocess.CompletedProcess[str]:
    who = fsck_identity(st, as_user)
    full = (unprivileged_argv(*who) if who is not None else []) + argv
    env = {"PATH": tools.TOOL_PATH, "LC_ALL": "C", "PYTHONDONTWRITEBYTECODE": "1", "E2FSCK_CONFIG": "/dev/null"}
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", cwd="/", env=env, pass_fds=pass_fds,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its e2fsck
        out, _ = proc.communicate()
        raise ExternalToolError(path, f"{tool} timed out after {timeout:.0f} s (killed)", tool=tool, returncode=-1,
                                output_tail=output_tail(out or "")) from None
    return subprocess.CompletedProcess(full, proc.returncode, out, None)


def _run_child(path: str, image_fd: int, st: os.stat_result, spec: dict[str, Any],
               as_user: tuple[int, int] | None, timeout: float) -> dict[str, Any]:
    child_fd = _child_fd(image_fd, writable=True)
    try:
        os.set_inheritable(child_fd, True)
        spec = {**spec, "fd": child_fd}
        proc = _spawn(tools.python_module_argv("sifoverlay.ext3.fsck", json.dumps(spec)), st, as_user,
                      (child_fd,), timeout, path, "e2fsck")
    finally:
        os.close(child_fd)
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    try:
        report: dict[str, Any] = json.loads(last[0]) if last else {}
    except ValueError:
        report = {}
    if proc.returncode != 0 or not report:
        return {"error": f"unprivileged fsck process exited {proc.returncode}: "
                         f"{output_tail(proc.stdout or '') or '(no output)'}", "returncode": -1,
                "output_tail": output_tail(proc.stdout or "")}
    return report


# --- the unprivileged child -----------------------------------------------------------------------
def _copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    while length > 0:
        try:
            done = os.copy_file_range(src, dst, min(length, 1 << 30), src_off, dst_off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            done = 0
        if done <= 0:  # not supported here: plain copy
            data = os.pread(src, min(length, _CHUNK), src_off)
            if not data:
                raise OSError(errno.EIO, "short read while copying the ext3 region")
            REAL_IO.pwrite(dst, data, dst_off)
            done = len(data)
        src_off += done
        dst_off += done
        length -= done


def _holds_journal_superblock(chunk: bytes) -> bool:
    for at in range(0, len(chunk) - 8 + 1, 1024):  # every block boundary (blocks are n x 1 KiB)
        if chunk[at:at + 4] == _JBD2_MAGIC and int.from_bytes(chunk[at + 4:at + 8], "big") in _JBD2_SUPERBLOCK_TYPES:
            return True
    return False


def _write_back(image: int, offset: int, tmp: int, size: int) -> int:
    """Write the chunks of `tmp` that differ from the region back into it, in a crash-safe
    order (module docstring). Returns the number of bytes written."""
    journal: list[tuple[int, bytes]] = []
    head: list[tuple[int, bytes]] = []
    written = 0
    for start, length in _data_extents(tmp, 0, size):
        pos = start - start % _CHUNK
        while pos < start + length:
            want = os.pread(tmp, min(_CHUNK, size - pos), pos)
            have = os.pread(image, len(want), offset + pos)
            if want != have:
                if pos < 4096:
                    head.append((pos, want))
                elif _holds_journal_superblock(want):
                    journal.append((pos, want))
                else:
                    REAL_IO.pwrite(image, want, offset + pos)
                    written += len(want)
            pos += _CHUNK
    for batch in (journal, head):
        REAL_IO.fsync(image)
        for pos, want in batch:
            REAL_IO.pwrite(image, want, offset + pos)
            written += len(want)
    REAL_IO.fsync(image)
    return written


def _unnamed_file(directory: str) -> int:
    """An unnamed temporary file in `directory`: O_TMPFILE, else a random name unlinked
    at once (filesystems without O_TMPFILE)."""
    try:
        return REAL_IO.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    name = os.path.join(directory, f".sifoverlay-fsck-{os.getpid()}-{os.urandom(8).hex()}")
    fd = REAL_IO.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    REAL_IO.unlink(name)
    return fd


def _child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs as the unprivileged process: copy, e2fsck, write back. Returns the report."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (setpriv set it already as root)
    image, offset, size = int(spec["fd"]), int(spec["offset"]), int(spec["size"])
    tmp = _unnamed_file(spec["scratch_dir"])
    try:
        REAL_IO.truncate(tmp, size)
        for start, length in _data_extents(image, offset, offset + size):
            _copy_range(image, start, tmp, start - offset, length)
        argv = ["e2fsck", "-p"] + (["-f"] if spec.get("force") else []) + [f"/proc/self/fd/{tmp}"]
        os.set_inheritable(tmp, True)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", pass_fds=(tmp,), check=False)
        rc = proc.returncode
        report: dict[str, Any] = {"returncode": rc, "output_tail": output_tail(proc.stdout), "written": 0}
        if rc & ~_FSCK_OK_BITS or rc < 0:
            return report  # nothing is written back from a failed check
        report["written"] = _write_back(image, offset, tmp, size)
        return report
    finally:
        os.close(tmp)


# --- the read-only gate (mount=kernel) -------------------------------------------------------------
def _check_read_only(target: str, image_fd: int, st: os.stat_result, offset: int, size: int,
                     as_user: tuple[int, int] | None, timeout: float) -> FsckResult:
    Superblock.read(image_fd, offset, size=size)  # bounds: the filesystem fits its region
    child_fd = _child_fd(image_fd, writable=False)
    try:
        os.set_inheritable(child_fd, True)
        source = f"/proc/self/fd/{child_fd}?offset={offset}"
        probe = _spawn(["dumpe2fs", "-h", source], st, as_user, (child_fd,), timeout, target, "dumpe2fs")
        if probe.returncode != 0:
            raise Ext3FormatError(
                target, f"ext3 overlay at offset {offset}: primary superblock unusable: {_findings(probe.stdout)}",
                tool="dumpe2fs", returncode=probe.returncode, output_tail=_findings(probe.stdout),
            )
        proc = _spawn(["e2fsck", "-f", "-n", source], st, as_user, (child_fd,), timeout, target, "e2fsck")
    finally:
        os.close(child_fd)
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
    lines = (line for line in output.splitlines() if not line.startswith(("e2fsck 1.", "dumpe2fs 1.")))
    return output_tail(re.sub(r"/proc/self/fd/\d+(\?offset=\d+)?", "the overlay", "\n".join(lines)))


if __name__ == "__main__":
    try:
        print(json.dumps(_child_main(json.loads(sys.argv[1]))))
    except Exception as exc:  # reported to the root parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "returncode": -1, "output_tail": ""}))
        sys.exit(1)
