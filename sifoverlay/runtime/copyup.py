"""Keep world-writable directories world-writable in a fuse2fs upper.

fuse2fs (e2fsprogs 1.47) creates every directory with ``mode & ~(S_ISUID | 022)`` - a
fixed umask of libext2fs - and fuse-overlayfs copies a directory up with mkdir and no
chmod afterwards. So the first write into /tmp (1777 in the image) copies it up as 1755
root: from then on only root may create files there, in this run and every later one.

Before fuse-overlayfs starts, the runtime therefore copies such directories up itself,
with their exact mode, owner and times: every directory of the lower layers, at most
`MAX_DEPTH` levels deep, that grants write to group or others, plus its parents. Copies
left 022-masked by earlier runs (exactly the lower mode minus 022) are repaired.

Both trees are served by the job user's own FUSE daemons: whatever they answer is hers to
choose, a directory now and a symlink to /etc a moment later (docs/security.md, finding
3). So, as root, the copy-up runs in a child process as the job user (setpriv: her uid and
gid, no groups, no capabilities, no_new_privs) - it can do nothing she could not do
herself - and even there every step works on descriptors: each component is opened with
``openat(parent, name, O_DIRECTORY|O_NOFOLLOW)``, created with ``mkdirat`` and set with
fchown/fchmod/futimens on the opened directory, so no name is ever followed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from sifoverlay.errors import ExternalToolError
from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)

MAX_DEPTH = 3
_MASKED = 0o022
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
TIMEOUT = 300.0


def _lower_stat(lowers: Sequence[str], rel: str) -> os.stat_result | None:
    """Attributes of `rel` in the merged lower stack (first layer = top wins)."""
    for lower in lowers:
        try:
            return os.lstat(os.path.join(lower, rel))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def _shared_dirs(lowers: Sequence[str]) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, stat) of group/other-writable directories, top layer winning."""
    seen: set[str] = set()
    for lower in lowers:
        for root, dirs, _files in os.walk(lower):
            rel_root = os.path.relpath(root, lower)
            depth = 0 if rel_root == "." else rel_root.count("/") + 1
            if depth >= MAX_DEPTH:
                dirs[:] = []
            for name in list(dirs):
                rel = os.path.normpath(os.path.join(rel_root, name))
                if rel in seen:
                    continue
                seen.add(rel)
                st = _lower_stat(lowers, rel)
                if st is not None and stat.S_ISDIR(st.st_mode) and st.st_mode & _MASKED:
                    yield rel, st
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


def as_user(uid: int | None, gid: int | None) -> bool:
    """Does the copy-up run in a child as the job user (root, for a user other than root)?"""
    return os.geteuid() == 0 and uid is not None and gid is not None and uid != 0 and gid != 0


def prepare_upper(upper: str, lowers: Sequence[str], *, uid: int | None = None, gid: int | None = None,
                  io: FileIO = REAL_IO, child: UserChild | None = None) -> list[str]:
    """Copy up / repair the shared directories in `upper`; returns what was changed.
    As root with a job user (`uid`/`gid`, not 0) the work runs as that user in a child
    (`child`: one started earlier by `UserChild.start`, else a new one)."""
    if as_user(uid, gid):
        assert uid is not None and gid is not None
        try:
            started = child if child is not None and child.uid == uid else UserChild.start(uid, gid)
            changed = [str(c) for c in started.run(upper, lowers)["changed"]]
        except ExternalToolError as exc:  # only /tmp & co. stay 1755 then: not worth failing the job
            log.error("%s", exc)
            return []
    else:
        changed = prepare_here(upper, lowers, io=io)
    if changed:
        log.info("prepared shared directories in the upper: %s", ", ".join(changed))
    return changed


def run_as_user(upper: str, lowers: Sequence[str], uid: int, gid: int, *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Run the copy-up as uid:gid (no groups, no capabilities, no_new_privs); returns the
    child's report: {"changed": [...], "uid", "euid", "cap_eff", "no_new_privs"}."""
    return UserChild.start(uid, gid).run(upper, lowers, timeout=timeout)


class UserChild:
    """The copy-up child as the job user, started before the mounts it works on exist: the
    Prolog starts it first thing, so its interpreter starts while the lease is taken and
    the daemons mount (on every rw job start). It waits for its work on stdin; `cancel`
    (or a closed stdin) ends it having done nothing."""

    def __init__(self, proc: subprocess.Popen[str], uid: int) -> None:
        self.proc, self.uid = proc, uid

    @classmethod
    def start(cls, uid: int, gid: int) -> UserChild:
        from sifoverlay.ext3.tools import TOOL_PATH, python_module_argv, unprivileged_argv

        argv = [*unprivileged_argv(uid, gid), *python_module_argv("sifoverlay.runtime.copyup")]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", cwd="/",
                                env={"PATH": TOOL_PATH, "LC_ALL": "C", "PYTHONDONTWRITEBYTECODE": "1"},
                                start_new_session=True)
        return cls(proc, uid)

    def cancel(self) -> None:
        """End the child if it still waits (idempotent; reaps it)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.communicate()

    def run(self, upper: str, lowers: Sequence[str], *, timeout: float = TIMEOUT) -> dict[str, Any]:
        proc, uid = self.proc, self.uid
        try:
            out, err = proc.communicate(json.dumps({"upper": upper, "lowers": list(lowers)}), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise ExternalToolError(upper, f"copy-up as uid {uid} timed out after {timeout:.0f} s (killed)",
                                    tool="copyup", returncode=-1, output_tail="") from None
        return _report(upper, uid, proc.returncode, out, err)


def _report(upper: str, uid: int, returncode: int, out: str, err: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    if returncode != 0 or "changed" not in report:
        tail = " | ".join((err or out).strip().splitlines()[-3:])
        raise ExternalToolError(upper, f"copy-up as uid {uid} failed (exit {returncode}): {tail or 'no output'}",
                                tool="copyup", returncode=returncode, output_tail=tail)
    for line in (err or "").strip().splitlines():
        log.warning("copy-up: %s", line)
    return report


def prepare_here(upper: str, lowers: Sequence[str], *, io: FileIO = REAL_IO) -> list[str]:
    """The copy-up in this process, on descriptors only (see the module docstring)."""
    changed = []
    parent, name = os.path.split(os.path.abspath(upper))
    try:
        top = os.open(parent, _DIR_FLAGS)  # the ext3 mount point: a mount root, not a link
        try:
            upper_fd = os.open(name, _DIR_FLAGS, dir_fd=top)
        finally:
            os.close(top)
    except OSError as exc:
        log.warning("upper %s: %s: nothing copied up", upper, exc.strerror)
        return []
    try:
        for rel, _st in _shared_dirs(lowers):
            try:
                if _ensure_dir(upper_fd, rel, lowers, io):
                    changed.append(rel)
            except OSError as exc:  # a name that changed under us: leave it
                log.warning("copy-up of %s skipped: %s", rel, exc.strerror)
    finally:
        os.close(upper_fd)
    return changed


def _child(parent: int, name: str) -> int | None:
    """openat(parent, name, O_DIRECTORY|O_NOFOLLOW); None when absent."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _ensure_dir(upper_fd: int, rel: str, lowers: Sequence[str], io: FileIO) -> bool:
    parts = rel.split("/")
    touched = False
    opened: list[int] = []
    parent = upper_fd
    try:
        for end in range(1, len(parts) + 1):
            name = parts[end - 1]
            st = _lower_stat(lowers, "/".join(parts[:end]))
            if st is None or not stat.S_ISDIR(st.st_mode):
                return touched
            wanted = stat.S_IMODE(st.st_mode)
            fd = _child(parent, name)
            if fd is None:
                if _exists(parent, f".wh.{name}"):
                    return touched  # deleted in the overlay: leave it deleted
                os.mkdir(name, 0o700, dir_fd=parent)  # io-seam: exempt (upper of a FUSE mount, not journaled)
                fd = _child(parent, name)
                if fd is None:
                    raise OSError(errno.ENOENT, "vanished right after mkdir", name)
                opened.append(fd)
                try:
                    os.chown(fd, st.st_uid, st.st_gid)  # fchown: the directory we opened, nothing else
                except PermissionError:  # not fuse2fs -o fakeroot: the user keeps it, mode still set
                    log.warning("copy-up of %s: cannot give it to %d:%d", rel, st.st_uid, st.st_gid)
                os.chmod(fd, wanted)  # io-seam: exempt (fchmod of the fd just opened)
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                touched = True
                parent = fd
                continue
            opened.append(fd)
            if _exists(fd, ".wh..wh..opq"):
                return touched  # made opaque in the overlay: not ours to fix
            current = os.fstat(fd)
            if end == len(parts) and stat.S_IMODE(current.st_mode) == wanted & ~_MASKED and wanted != wanted & ~_MASKED:
                os.chmod(fd, wanted)  # io-seam: exempt (fchmod: the 022-masked copy-up of an earlier run)
                touched = True
            parent = fd
        return touched
    finally:
        for fd in opened:
            os.close(fd)


def _identity() -> dict[str, Any]:
    status = {}
    with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {"uid": os.getuid(), "euid": os.geteuid(), "cap_eff": int(status.get("CapEff", "0"), 16),
            "no_new_privs": int(status.get("NoNewPrivs", "0"))}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    given = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()  # started early: the work comes on stdin
    if not given.strip():
        sys.exit(0)  # cancelled before it had anything to do
    spec = json.loads(given)
    report = {"changed": prepare_here(spec["upper"], spec["lowers"]), **_identity()}
    print(json.dumps(report))
