"""Power-loss simulator for crash tests: judge which recorded operations a power cut may
have kept, and rebuild such an on-disk state from an op log.

It works on the log of a `sifoverlay.fsio.CountingIO(keep_log=True, name_fds=True)` run
(every file an entry touches is named by absolute path, fd-relative calls included).
Each logged op becomes one or more *units* (`units`):

  data  pwrite, truncate, punch_hole, fallocate, `open(O_TRUNC)` (a truncation to 0),
        chmod (inode metadata), an external tool's effect (`external`: one opaque unit
        whose result is the snapshot of its files): kept for sure only when a later
        fsync of the same file follows;
  name  create (`open(O_CREAT)`), unlink, mkdir, rmdir, rename, link, symlink: kept for
        sure only when a later fsync of the parent directory (every parent, for a rename)
        follows (crash-safety.md R12);
  sync  fsync (of a file, or of a directory through its fd) and fsync_dir.

A unit kept for sure is *forced*. Every other unit of the prefix before the cut may or
may not have reached the disk, independently of the others and of their order (the page
cache writes back in any order): `plan_cut` draws a concrete outcome for a model:

  drop       every unforced unit lost;
  keep       every unit kept (what a process kill leaves);
  subset     each unforced unit kept with probability 1/2 (later ones may survive while
             earlier ones are lost);
  torn-512, torn-4096
             each unforced unit kept with probability 3/4, and 1..3 of the kept unforced
             writes torn: only a random subset of their 512/4096-byte sectors (aligned
             on file offsets) reaches the disk.

`apply_cut` replays a plan onto a copy of the pre-state. Replaying deliberately bypasses
the I/O seam: it rebuilds what a power cut would have left, so it must not be counted.
An op kind this module does not know raises `UnmodelledOp`: every mutating op of
`sifoverlay.fsio.FileIO` must be modelled here (tests/crash/test_crashsim.py checks it).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

Op = tuple[str, dict[str, object]]

MODELS: Final = ("drop", "keep", "subset", "torn-512", "torn-4096")
DATA_OPS: Final = frozenset({"pwrite", "truncate", "punch_hole", "fallocate", "otrunc", "chmod", "external"})
NAME_OPS: Final = frozenset({"create", "unlink", "mkdir", "rmdir", "rename", "link", "symlink"})
SYNC_OPS: Final = frozenset({"fsync", "fdatasync", "fsync_dir"})
MODELLED_OPS: Final = frozenset({"open", "close"}) | DATA_OPS | NAME_OPS | SYNC_OPS


class UnmodelledOp(Exception):
    """The op log holds an operation kind the simulator cannot replay."""


@dataclass(frozen=True, slots=True)
class Unit:
    index: int  # position of its op in the log
    op: str
    info: dict[str, object] = field(repr=False)
    kind: str  # "data" | "name" | "sync" | "none"
    files: tuple[str, ...]  # data: the file(s); name: the parent directories; sync: the synced path


def _s(value: object) -> str:
    return os.fsdecode(value) if isinstance(value, (str, bytes)) else str(value)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def units(ops: list[Op]) -> list[Unit]:
    """The log as units (see the module docstring)."""
    out: list[Unit] = []
    for i, (op, info) in enumerate(ops):
        path = _s(info.get("path")) if info.get("path") is not None else None
        if op == "open":
            flags = int(info.get("flags", 0))  # type: ignore[call-overload]
            if path is None:
                raise UnmodelledOp(f"op {i}: open without a path")
            if flags & os.O_CREAT:
                out.append(Unit(i, "create", info, "name", (_parent(path),)))
            if flags & os.O_TRUNC:
                out.append(Unit(i, "otrunc", info, "data", (path,)))
        elif op == "close":
            continue
        elif op in DATA_OPS:
            files = tuple(_s(p) for p in info["paths"]) if op == "external" else (str(path),)  # type: ignore[attr-defined]
            out.append(Unit(i, op, info, "data", files))
        elif op in ("rename", "link", "symlink"):
            dirs = {_parent(_s(info["dst"]))}
            if op == "rename":
                dirs.add(_parent(_s(info["src"])))
            out.append(Unit(i, op, info, "name", tuple(sorted(dirs))))
        elif op in NAME_OPS:
            out.append(Unit(i, op, info, "name", (_parent(str(path)),)))
        elif op in SYNC_OPS:
            out.append(Unit(i, "fsync_dir" if op == "fsync_dir" else "fsync", info, "sync", (os.path.abspath(str(path)),)))
        else:
            raise UnmodelledOp(f"op {i}: {op!r} is not modelled by sifoverlay.crashsim")
    return out


def forced(us: list[Unit]) -> list[bool]:
    """For each unit, whether it survives every power cut at the end of `us`."""
    synced_after: set[str] = set()  # paths fsynced by a later unit (file or directory)
    out = [False] * len(us)
    for j in range(len(us) - 1, -1, -1):
        u = us[j]
        if u.kind == "sync":
            synced_after.add(u.files[0])
            out[j] = True
        elif u.kind == "data":
            out[j] = all(f in synced_after for f in u.files)
        elif u.kind == "name":
            out[j] = all(d in synced_after for d in u.files)
        else:
            out[j] = True
    return out


def durable_flags(ops: list[Op]) -> list[bool]:
    """Per op: whether every unit of it survives a power cut at the end of `ops`."""
    us = units(ops)
    keep = forced(us)
    out = [True] * len(ops)
    for u, k in zip(us, keep):
        out[u.index] = out[u.index] and k
    return out


# --- plans -------------------------------------------------------------------------------
Plan = dict[int, object]  # unit position -> False (lost) | True (kept) | ("torn", sector, [kept sector starts])


def plan_cut(us: list[Unit], model: str, rng: random.Random) -> Plan:
    """A concrete power-cut outcome of the units `us` (the prefix before the cut)."""
    must = forced(us)
    free = [j for j, u in enumerate(us) if not must[j] and u.kind != "sync"]
    plan: Plan = {j: True for j in range(len(us))}
    if model == "keep":
        return plan
    if model == "drop":
        for j in free:
            plan[j] = False
        return plan
    if model == "subset":
        for j in free:
            plan[j] = rng.random() < 0.5
        return plan
    if model.startswith("torn-"):
        sector = int(model.split("-", 1)[1])
        for j in free:
            plan[j] = rng.random() < 0.75
        writes = [j for j in free if plan[j] and us[j].op == "pwrite" and _sectors(us[j], sector)]
        for j in rng.sample(writes, min(len(writes), rng.randint(1, 3))):
            starts = _sectors(us[j], sector)
            kept = sorted(rng.sample(starts, rng.randint(0, len(starts) - 1))) if len(starts) > 1 else []
            plan[j] = ("torn", sector, kept)
        return plan
    raise ValueError(f"unknown power-loss model {model!r}")


def _sectors(u: Unit, sector: int) -> list[int]:
    """Start offsets of the sector-aligned pieces of a pwrite."""
    offset = int(u.info["offset"])  # type: ignore[call-overload]
    end = offset + int(u.info["length"])  # type: ignore[call-overload]
    out = []
    pos = offset
    while pos < end:
        out.append(pos)
        pos = (pos // sector + 1) * sector
    return out


def plan_key(plan: Plan) -> str:
    """A short stable name of a plan (which units were lost or torn)."""
    lost = [j for j, v in plan.items() if v is False]
    torn = [j for j, v in plan.items() if isinstance(v, tuple)]
    return f"lost={lost} torn={torn}"


# --- replay ------------------------------------------------------------------------------
def apply_cut(us: list[Unit], plan: Plan, *, under: str | None = None) -> None:
    """Replay the kept units of `plan` in log order onto the files on disk (a copy of the
    pre-state). Units on files outside `under` (private scratch of tools) are skipped."""
    for j, u in enumerate(us):
        verdict = plan.get(j, True)
        if verdict is False or u.kind in ("sync", "none"):
            continue
        if under is not None and not any(_s(f).startswith(under) for f in _touched(u)):
            continue
        replay_unit(u, torn=verdict if isinstance(verdict, tuple) else None)


def _touched(u: Unit) -> list[str]:
    if u.op == "external":
        return list(u.files)
    return [_s(u.info[k]) for k in ("dst", "path") if u.info.get(k) is not None]


def replay_unit(u: Unit, *, torn: object = None) -> None:
    """Apply one unit to the files on disk. Ops on files that do not exist (their creation
    was lost) are skipped. `torn` = ("torn", sector, [kept sector starts]) for a pwrite."""
    info = u.info
    path = _s(info.get("path")) if info.get("path") is not None else ""
    if path.endswith(" (deleted)"):
        return
    op = u.op
    if op == "create":
        if not os.path.lexists(path) and os.path.isdir(os.path.dirname(path)):
            mode = int(info.get("mode", 0o644))  # type: ignore[call-overload]
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))  # io-seam: exempt (power-loss replay)
    elif op == "otrunc":
        if os.path.isfile(path):
            os.truncate(path, 0)  # io-seam: exempt (power-loss replay)
    elif op == "chmod":
        if os.path.lexists(path):
            os.chmod(path, int(info["mode"]))  # type: ignore[call-overload]  # io-seam: exempt (power-loss replay)
    elif op in ("pwrite", "truncate", "punch_hole", "fallocate"):
        if not os.path.isfile(path):
            return
        fd = os.open(path, os.O_WRONLY)  # io-seam: exempt (power-loss replay)
        try:
            _replay_data(fd, op, info, torn)
        finally:
            os.close(fd)
    elif op == "external":
        snapshots = info.get("snapshot")
        if not isinstance(snapshots, dict):
            raise UnmodelledOp(f"external {info.get('tool')} logged without a snapshot of its files")
        for target, snap in snapshots.items():
            if os.path.isdir(os.path.dirname(_s(target))):  # else its directory's creation was lost
                restore_file(snap, _s(target))
    elif op == "rename":
        if os.path.lexists(_s(info["src"])) and os.path.isdir(_parent(_s(info["dst"]))):
            os.rename(_s(info["src"]), _s(info["dst"]))  # io-seam: exempt (power-loss replay)
    elif op == "link":
        if os.path.lexists(_s(info["src"])) and not os.path.lexists(_s(info["dst"])) and os.path.isdir(_parent(_s(info["dst"]))):
            os.link(_s(info["src"]), _s(info["dst"]))  # io-seam: exempt (power-loss replay)
    elif op == "symlink":
        if not os.path.lexists(_s(info["dst"])) and os.path.isdir(_parent(_s(info["dst"]))):
            os.symlink(_s(info["src"]), _s(info["dst"]))  # io-seam: exempt (power-loss replay)
    elif op == "unlink":
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)  # io-seam: exempt (power-loss replay)
    elif op == "mkdir":
        if not os.path.lexists(path) and os.path.isdir(os.path.dirname(path)):
            os.mkdir(path, int(info.get("mode", 0o755)))  # type: ignore[call-overload]  # io-seam: exempt (power-loss replay)
    elif op == "rmdir":
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)  # io-seam: exempt (power-loss replay)
    else:
        raise UnmodelledOp(f"{op!r} is not modelled by sifoverlay.crashsim")


def _replay_data(fd: int, op: str, info: dict[str, object], torn: object) -> None:
    from .fsio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate

    if op == "pwrite":
        data = bytes(info["data"])  # type: ignore[call-overload]
        offset = int(info["offset"])  # type: ignore[call-overload]
        if isinstance(torn, tuple):
            _, sector, kept = torn
            for start in kept:
                stop = min(offset + len(data), (start // sector + 1) * sector)
                os.pwrite(fd, data[start - offset : stop - offset], start)  # io-seam: exempt (power-loss replay)
        else:
            os.pwrite(fd, data, offset)  # io-seam: exempt (power-loss replay)
    elif op == "truncate":
        os.ftruncate(fd, int(info["length"]))  # type: ignore[call-overload]  # io-seam: exempt (power-loss replay)
    elif op == "punch_hole":
        offset, length = int(info["offset"]), int(info["length"])  # type: ignore[call-overload]
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    else:  # fallocate
        mode = int(info.get("mode", 0))  # type: ignore[call-overload]
        _fallocate(fd, mode, int(info["offset"]), int(info["length"]))  # type: ignore[call-overload]


# --- files: sparse copies and state fingerprints -------------------------------------------
def data_extents(fd: int) -> list[tuple[int, int]]:
    """[(start, end)] of the data extents (SEEK_DATA/SEEK_HOLE) of an open file."""
    size = os.fstat(fd).st_size
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def snapshot_file(path: str, dst: str) -> str | None:
    """Sparse copy of `path` to `dst` (None when `path` does not exist)."""
    if not os.path.exists(path):
        return None
    restore_file(path, dst)
    shutil.copymode(path, dst)
    return dst


def restore_file(snapshot: object, path: str) -> None:
    """Make `path` equal the snapshot (bytes, length and holes), rewriting the same inode
    when it exists (an open descriptor keeps seeing it); None = `path` absent."""
    if snapshot is None:
        if os.path.lexists(path):
            os.unlink(path)  # io-seam: exempt (power-loss replay / test snapshot)
        return
    src = os.open(_s(snapshot), os.O_RDONLY)
    dst = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # io-seam: exempt (power-loss replay / test snapshot)
    try:
        os.ftruncate(dst, 0)  # io-seam: exempt (power-loss replay / test snapshot)
        for start, end in data_extents(src):
            pos = start
            while pos < end:
                chunk = os.pread(src, min(4 << 20, end - pos), pos)
                os.pwrite(dst, chunk, pos)  # io-seam: exempt (power-loss replay / test snapshot)
                pos += len(chunk)
        os.ftruncate(dst, os.fstat(src).st_size)  # io-seam: exempt (power-loss replay / test snapshot)
    finally:
        os.close(src)
        os.close(dst)


def file_id(path: str) -> str:
    """Exact identity of a file: length, data/hole map (SEEK_DATA/SEEK_HOLE) and bytes."""
    h = hashlib.blake2b(digest_size=20)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents = data_extents(fd)
        h.update(f"{size}:{extents}".encode())
        for start, end in extents:
            pos = start
            while pos < end:
                chunk = os.pread(fd, min(4 << 20, end - pos), pos)
                h.update(chunk)
                pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def tree_state(roots: Iterable[str]) -> str:
    """Hash of everything under `roots`: names, kinds, modes, file identities (the
    distinct end states a crash model produced)."""
    h = hashlib.blake2b(digest_size=16)
    for root in roots:
        if not os.path.lexists(root):
            h.update(f"{root}:absent\n".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            h.update(f"D {os.path.relpath(dirpath, root)} {oct(os.lstat(dirpath).st_mode)}\n".encode())
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                ident = file_id(full) if stat.S_ISREG(st.st_mode) else os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
                h.update(f"F {name} {oct(st.st_mode)} {ident}\n".encode())
    return h.hexdigest()


def open_fds() -> set[int]:
    """This process's open fds (without the one listdir used for /proc/self/fd itself)."""
    out = set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out


def replay_op(op: str, info: dict[str, object], *, torn: bool = False) -> None:
    """Apply one logged op (every unit of it) to the files on disk; `torn` writes only
    the first half of a pwrite (kept for bench/compare_sync's simple "torn" variant)."""
    for u in units([(op, info)]):
        if u.kind in ("sync", "none"):
            continue
        if torn and u.op == "pwrite":
            data = bytes(info["data"])  # type: ignore[call-overload]
            if os.path.isfile(_s(info.get("path"))):
                fd = os.open(_s(info.get("path")), os.O_WRONLY)  # io-seam: exempt (power-loss replay)
                try:
                    os.pwrite(fd, data[: len(data) // 2], int(info["offset"]))  # type: ignore[call-overload]  # io-seam: exempt (power-loss replay)
                finally:
                    os.close(fd)
            continue
        replay_unit(u)
