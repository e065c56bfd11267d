"""Keep world-writable directories world-writable in a fuse2fs upper.

fuse2fs (e2fsprogs 1.47) creates every directory with ``mode & ~(S_ISUID | 022)`` - a
fixed umask of libext2fs - and fuse-overlayfs copies a directory up with mkdir and no
chmod afterwards. So the first write into /tmp (1777 in the image) copies it up as 1755
root: from then on only root may create files there, in this run and every later one.

Before fuse-overlayfs starts, the runtime therefore copies such directories up itself,
with their exact mode, owner and times: every directory of the lower layers, at most
`MAX_DEPTH` levels deep, that grants write to group or others, plus its parents. Copies
left 022-masked by earlier runs (exactly the lower mode minus 022) are repaired.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence

from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)

MAX_DEPTH = 3
_MASKED = 0o022


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


def prepare_upper(upper: str, lowers: Sequence[str], *, io: FileIO = REAL_IO) -> list[str]:
    """Copy up / repair the shared directories in `upper`; returns what was changed."""
    changed = []
    for rel, st in _shared_dirs(lowers):
        if _ensure_dir(upper, rel, lowers, io):
            changed.append(rel)
    if changed:
        log.info("prepared shared directories in the upper: %s", ", ".join(changed))
    return changed


def _ensure_dir(upper: str, rel: str, lowers: Sequence[str], io: FileIO) -> bool:
    parts = rel.split("/")
    touched = False
    for end in range(1, len(parts) + 1):
        sub = "/".join(parts[:end])
        st = _lower_stat(lowers, sub)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return touched
        path = os.path.join(upper, sub)
        wanted = stat.S_IMODE(st.st_mode)
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            if _whited_out(upper, sub):
                return touched  # deleted in the overlay: leave it deleted
            io.mkdir(path, 0o700)
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
            io.chmod(path, wanted)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            touched = True
            continue
        if not stat.S_ISDIR(current.st_mode) or os.path.lexists(os.path.join(path, ".wh..wh..opq")):
            return touched  # replaced or made opaque in the overlay: not ours to fix
        if end == len(parts) and stat.S_IMODE(current.st_mode) == wanted & ~_MASKED and wanted != wanted & ~_MASKED:
            io.chmod(path, wanted)  # the 022-masked copy-up of an earlier run
            touched = True
    return touched


def _whited_out(upper: str, rel: str) -> bool:
    parent, name = os.path.split(rel)
    return os.path.lexists(os.path.join(upper, parent, f".wh.{name}"))
