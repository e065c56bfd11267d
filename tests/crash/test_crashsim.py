"""The power-loss model itself (sifoverlay.crashsim): which ops a cut may lose, how
subsets and torn writes are drawn, how every op kind is replayed, and that every mutating
operation of FileIO is modelled."""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import pytest

from sifoverlay import crashsim, fsio
from sifoverlay.crashsim import apply_cut, file_id, forced, plan_cut, units
from sifoverlay.fsio import CountingIO

pytestmark = [pytest.mark.crash]


def _logged(tmp_path: Path, body) -> list[crashsim.Op]:  # type: ignore[no-untyped-def]
    io = CountingIO(keep_log=True, name_fds=True)
    body(io)
    return io.log


def test_every_fileio_operation_is_modelled() -> None:
    """Every op name FileIO reports to `_before` is one the simulator can replay."""
    tree = ast.parse(Path(fsio.__file__).read_text())
    reported = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_before"
        and node.args and isinstance(node.args[0], ast.Constant)
    }
    assert {"open", "pwrite", "truncate", "fsync", "punch_hole", "rename", "unlink", "mkdir", "rmdir",
            "chmod", "fsync_dir", "link", "external"} <= reported
    assert reported <= crashsim.MODELLED_OPS, reported - crashsim.MODELLED_OPS


def test_unknown_op_fails_loudly() -> None:
    with pytest.raises(crashsim.UnmodelledOp, match="'frobnicate'"):
        units([("frobnicate", {"path": "/x"})])


def test_barriers_data_by_file_fsync_names_by_directory_fsync(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    f = d / "f"

    def body(io: CountingIO) -> None:
        fd = io.open(str(f), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # create (name) + otrunc (data)
        io.pwrite(fd, b"a" * 100, 0)
        io.fsync(fd)  # covers otrunc + pwrite, not the creation
        io.pwrite(fd, b"b" * 10, 0)  # never synced
        io.chmod(str(f), 0o640)  # inode metadata: synced by the file's fsync
        io.fsync(fd)
        io.close(fd)
        io.mkdir(str(d / "sub"))
        io.rmdir(str(d / "sub"))
        io.fsync_dir(str(d))  # now the creation, mkdir and rmdir are durable

    log = _logged(tmp_path, body)
    us = units(log)
    assert [u.op for u in us] == ["create", "otrunc", "pwrite", "fsync", "pwrite", "chmod", "fsync", "mkdir", "rmdir", "fsync_dir"]
    assert [u.kind for u in us][:3] == ["name", "data", "data"]
    assert forced(us) == [True] * len(us)
    before_dir_sync = units(log[:-1])
    assert forced(before_dir_sync)[0] is False  # creation needs the directory fsync
    assert forced(before_dir_sync)[1:3] == [True, True]
    mid = units(log[:4])  # create, open/otrunc, pwrite, fsync, pwrite(b)
    assert forced(mid) == [False, True, True, True, False]


def test_subset_lets_a_later_write_survive_an_earlier_lost_one(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(8192))

    def body(io: CountingIO) -> None:
        fd = io.open(str(f), os.O_WRONLY)
        io.pwrite(fd, b"1" * 4096, 0)
        io.pwrite(fd, b"2" * 4096, 4096)
        io.close(fd)

    pristine = f.read_bytes()
    log = _logged(tmp_path, body)  # (the logged run really writes)
    seen = set()
    for k in range(40):
        f.write_bytes(pristine)
        us = units(log)
        apply_cut(us, plan_cut(us, "subset", random.Random(k)))
        seen.add(f.read_bytes()[::4096])
    assert seen == {b"\0\0", b"1\0", b"\x002", b"12"}  # every subset, the reordered one included


def test_torn_writes_keep_whole_aligned_sectors(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(20000))

    def body(io: CountingIO) -> None:
        fd = io.open(str(f), os.O_WRONLY)
        io.pwrite(fd, b"\xff" * 9000, 100)  # spans sectors 0..18 (512) / 0..2 (4096)
        io.close(fd)

    pristine = f.read_bytes()
    log = _logged(tmp_path, body)
    for sector in (512, 4096):
        shapes = set()
        for k in range(30):
            f.write_bytes(pristine)
            us = units(log)
            plan = plan_cut(us, f"torn-{sector}", random.Random(k))
            apply_cut(us, plan)
            data = f.read_bytes()
            assert data[:100] == pristine[:100] and data[9100:] == pristine[9100:]  # nothing outside the write
            pieces = [(max(100, a), min(9100, a + sector)) for a in range(0, 9100, sector) if a + sector > 100]
            kept = [data[lo:hi] == b"\xff" * (hi - lo) for lo, hi in pieces]
            for (lo, hi), whole in zip(pieces, kept):  # each aligned sector: all written or not at all
                assert whole or data[lo:hi] == bytes(hi - lo), (sector, lo)
            if isinstance(plan[0], tuple):
                assert not all(kept)  # really torn: not every sector
            shapes.add(tuple(kept))
        assert len(shapes) > 3


def test_punch_hole_replays_as_a_hole_and_file_id_sees_holes(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * (64 << 10))

    def body(io: CountingIO) -> None:
        fd = io.open(str(f), os.O_WRONLY)
        io.punch_hole(fd, 16 << 10, 16 << 10)
        io.close(fd)

    log = _logged(tmp_path, body)
    punched = file_id(str(f))
    f.write_bytes(b"x" * (64 << 10))
    apply_cut(units(log), {j: True for j in range(len(units(log)))})
    assert file_id(str(f)) == punched
    zeros = tmp_path / "z"
    zeros.write_bytes(b"x" * (16 << 10) + bytes(16 << 10) + b"x" * (32 << 10))
    assert zeros.read_bytes() == f.read_bytes()
    fd = os.open(f, os.O_RDONLY)
    try:
        holes = crashsim.data_extents(fd)
    finally:
        os.close(fd)
    if holes != [(0, 64 << 10)]:  # the filesystem really punched: same bytes, other identity
        assert file_id(str(zeros)) != file_id(str(f))


def test_dir_fd_relative_ops_are_named_by_path(tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        log = _logged(tmp_path, lambda io: io.close(io.open("rel", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dfd)))
    finally:
        os.close(dfd)
    (op, info), = log
    assert op == "open" and info["path"] == str(tmp_path / "rel")
    assert units(log)[0].files == (str(tmp_path),)


def test_external_tool_is_one_opaque_op_replayed_from_its_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    snap = tmp_path / "snap"
    snap.write_bytes(b"tool output")
    log = [("external", {"tool": "mkfs", "paths": (str(out),), "snapshot": {str(out): str(snap)}}),
           ("fsync", {"fd": 9, "path": str(out)})]
    us = units(log)
    assert [(u.op, u.kind) for u in us] == [("external", "data"), ("fsync", "sync")]
    assert forced(units(log[:1])) == [False] and forced(us)[0]
    apply_cut(units(log[:1]), plan_cut(units(log[:1]), "drop", random.Random(0)))
    assert not out.exists()
    apply_cut(us, plan_cut(us, "drop", random.Random(0)))
    assert out.read_bytes() == b"tool output"
    with pytest.raises(crashsim.UnmodelledOp, match="snapshot"):
        crashsim.replay_unit(crashsim.Unit(0, "external", {"tool": "x", "paths": ("/y",)}, "data", ("/y",)))
