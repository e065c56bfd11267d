"""make_overlay_fs: the shape SingularityCE's `overlay create` gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.errors import ExternalToolError, UsageError
from sifoverlay.fsio import CountingIO, SimulatedCrash
from tests.conftest import require_tool
from tests.ext3.conftest import MIB, sh


def debugfs_ls(image: Path, directory: str = "/") -> dict[str, tuple[str, int, int]]:
    """name -> (octal mode, uid, gid) from `debugfs -R 'ls -l'`."""
    out = sh("debugfs", "-R", f"ls -l {directory}", str(image)).stdout
    entries = {}
    for line in out.splitlines():
        m = re.match(r"\s*\d+\s+(\d+)\s+\(\d+\)\s+(\d+)\s+(\d+)\s+\d+\s+\S+\s+\S+\s+(\S+)$", line)
        if m:
            entries[m.group(4)] = (m.group(1), int(m.group(2)), int(m.group(3)))
    return entries


@pytest.mark.parametrize("sparse", [True, False])
def test_shape_size_owner_and_allocation(tmp_path: Path, sparse: bool) -> None:
    require_tool("mkfs.ext3", "debugfs")
    img = tmp_path / "ov.img"
    ext3.make_overlay_fs(img, 65, sparse=sparse, uid=1234, gid=5678)
    st = img.stat()
    assert st.st_size == 65 * MIB
    assert st.st_mode & 0o777 == 0o600
    allocated = st.st_blocks * 512
    if sparse:
        assert allocated < 16 * MIB
    else:
        assert allocated >= 65 * MIB  # zero-filled and kept allocated (-E nodiscard)
    entries = debugfs_ls(img)
    assert entries["upper"] == ("40755", 1234, 5678)
    assert entries["work"] == ("40700", 1234, 5678)
    assert set(entries) == {".", "..", "lost+found", "upper", "work"}
    assert debugfs_ls(img, "/upper").keys() == {".", ".."}
    sb = ext3.Superblock.read(img, 0, size=65 * MIB)
    assert sb.is_clean and not sb.needs_recovery and sb.blocks_count * sb.block_size == 65 * MIB
    ext3.check_region_header(img)
    sh("e2fsck", "-fn", str(img))  # exit 0: consistent


def test_minimum_size_enforced(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"small.img: overlay size must be at least 64 MiB, got 63$"):
        ext3.make_overlay_fs(tmp_path / "small.img", 63)
    assert not (tmp_path / "small.img").exists()


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    img = tmp_path / "taken.img"
    img.write_bytes(b"precious")
    with pytest.raises(UsageError, match=r"taken.img: cannot create overlay image: file already exists"):
        ext3.make_overlay_fs(img, 64, sparse=True)
    assert img.read_bytes() == b"precious"


def test_missing_mkfs_removes_the_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    img = tmp_path / "ov.img"
    with pytest.raises(ExternalToolError) as err:
        ext3.make_overlay_fs(img, 64, sparse=True)
    assert err.value.tool == "mkfs.ext3" and err.value.returncode == 127
    assert str(err.value) == f"{img}: mkfs.ext3 is not installed"
    assert not img.exists()


def test_mkfs_failure_reports_tool_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "mkfs.ext3"
    fake.write_text("#!/bin/sh\necho 'line one'\necho 'mke2fs: disk on fire' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:/usr/bin:/bin")
    img = tmp_path / "ov.img"
    with pytest.raises(ExternalToolError) as err:
        ext3.make_overlay_fs(img, 64, sparse=True)
    assert err.value.returncode == 1 and err.value.output_tail == "line one | mke2fs: disk on fire"
    assert "\n" not in str(err.value)
    assert not img.exists()


def test_crash_mid_write_goes_through_the_io_seam(tmp_path: Path) -> None:
    img = tmp_path / "ov.img"
    io = CountingIO(crash_at=3, keep_log=True)  # open, pwrite, pwrite -> crash
    with pytest.raises(SimulatedCrash):
        ext3.make_overlay_fs(img, 64, io=io)
    assert [op for op, _ in io.log] == ["open", "pwrite", "pwrite"]
    counter = CountingIO()
    ext3.make_overlay_fs(tmp_path / "ok.img", 64, io=counter)
    assert counter.count == 1 + 16 + 5 + 1 + 1  # open, 16 x 4 MiB zeros, staging chmod/mkdir x4, mkfs (external), fsync
