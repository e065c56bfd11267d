"""replay_and_fsck on real crash images embedded at unaligned offsets (unprivileged child,
private copy, no loop device: docs/security.md finding 4)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.errors import ExternalToolError, ImageBusy
from tests.conftest import require_root, require_tool
from tests.ext3.conftest import MIB, kernel_mount, sh

OFFSET = 2 * MIB + 12345  # neither block- nor sector-aligned
SIZE = 64 * MIB
TAIL = 3001


def embed(image: Path, big: Path) -> tuple[bytes, bytes]:
    """Write `image` at OFFSET inside `big`, with random bytes before and after it."""
    head, tail = os.urandom(OFFSET), os.urandom(TAIL)
    with open(image, "rb") as src, open(big, "wb") as dst:
        dst.write(head)
        shutil.copyfileobj(src, dst, 4 * MIB)
        dst.write(tail)
    return head, tail


def outside_region(big: Path) -> tuple[bytes, bytes]:
    with open(big, "rb") as f:
        head = f.read(OFFSET)
        f.seek(OFFSET + SIZE)
        return head, f.read()


def at(big: Path) -> str:
    return f"{big}?offset={OFFSET}"  # read-only debugfs/dumpe2fs use is safe with ?offset=


def test_clean_filesystem_is_left_alone(overlay_img: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    embed(overlay_img, big)
    digest = ext3.hash_range(str(big), 0, big.stat().st_size)
    start = time.monotonic()
    result = ext3.replay_and_fsck(big, OFFSET, SIZE)
    assert time.monotonic() - start < 0.5  # no tool ran: only the superblock was read
    assert result == ext3.FsckResult(replayed=False, fixed=False, returncode=0, output_tail="", checked=False)
    assert ext3.hash_range(str(big), 0, big.stat().st_size) == digest


@pytest.mark.root
@pytest.mark.slow
def test_crash_image_is_replayed_without_a_loop_device(overlay_img: Path, tmp_path: Path) -> None:
    require_tool("debugfs", "dumpe2fs", "e2fsck", "cp")
    snap = tmp_path / "snap.img"
    with kernel_mount(overlay_img, tmp_path / "mnt") as mnt:
        crash = mnt / "upper" / "crash"
        crash.mkdir()
        for i in range(5):
            (crash / f"f{i}").write_bytes(f"payload {i}\n".encode() * 100)
        time.sleep(6.5)  # > 5 s: jbd2 commits the transaction to the journal
        # Copy while still mounted: home blocks may be stale, the journal holds the truth.
        sh("cp", "--sparse=always", str(overlay_img), str(snap))
    big = tmp_path / "big.sif"
    head, tail = embed(snap, big)

    before = ext3.Superblock.read(big, OFFSET, size=SIZE)
    assert before.needs_recovery and before.is_dirty
    info = sh("dumpe2fs", "-h", at(big)).stdout
    journal_start = int(next(line for line in info.splitlines() if line.startswith("Journal start")).split(":")[1])
    assert journal_start > 0  # an un-checkpointed transaction is waiting in the journal

    result = ext3.replay_and_fsck(big, OFFSET, SIZE)
    assert result.replayed and result.checked and result.returncode in (0, 1)
    assert result.fixed == (result.returncode == 1)

    after = ext3.Superblock.read(big, OFFSET, size=SIZE)
    assert not after.needs_recovery and after.is_clean
    listing = sh("debugfs", "-R", "ls /upper/crash", at(big)).stdout.split()
    assert {f"f{i}" for i in range(5)} <= set(listing)
    content = sh("debugfs", "-R", "cat /upper/crash/f3", at(big)).stdout
    assert content == "payload 3\n" * 100
    assert outside_region(big) == (head, tail)  # only the region was touched
    sh("e2fsck", "-fn", at(big))  # consistent now (read-only check)
    again = ext3.replay_and_fsck(big, OFFSET, SIZE)
    assert not again.checked


@pytest.mark.root
def test_dirty_state_from_fuse2fs_kill_is_checked(overlay_img: Path, tmp_path: Path) -> None:
    """fuse2fs leaves s_state 'not clean' when killed: e2fsck -p runs a full check."""
    require_root()
    sh("debugfs", "-w", "-R", "ssv state 0", str(overlay_img))
    assert ext3.Superblock.read(overlay_img).is_dirty
    result = ext3.replay_and_fsck(overlay_img, 0, SIZE)
    assert result.checked and not result.replayed and result.returncode in (0, 1)
    assert "13/16384 files" in result.output_tail
    assert ext3.Superblock.read(overlay_img).is_clean


@pytest.mark.root
def test_uncorrectable_damage_raises_external_tool_error(overlay_img: Path, tmp_path: Path) -> None:
    require_root()
    big = tmp_path / "big.bin"
    sh("debugfs", "-w", "-R", "clri <2>", str(overlay_img))  # wipe the root inode
    sh("debugfs", "-w", "-R", "ssv state 0", str(overlay_img))
    head, tail = embed(overlay_img, big)
    with pytest.raises(ExternalToolError) as err:
        ext3.replay_and_fsck(big, OFFSET, SIZE)
    assert err.value.tool == "e2fsck" and err.value.returncode & 4
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{big}: e2fsck failed on the ext3 at offset {OFFSET} with exit code")
    assert sh("losetup", "--associated", str(big)).stdout == ""  # loop device detached
    assert outside_region(big) == (head, tail)


@pytest.mark.root
def test_refuses_when_range_is_already_attached(overlay_img: Path) -> None:
    require_root()
    sh("debugfs", "-w", "-R", "ssv state 0", str(overlay_img))
    digest = hashlib.sha256(overlay_img.read_bytes()).hexdigest()
    with ext3.loop_device(overlay_img, 0, SIZE, read_only=True) as dev:
        with pytest.raises(ImageBusy, match=rf"attached to {dev} \(mounted\?\); refusing to fsck it"):
            ext3.replay_and_fsck(overlay_img, 0, SIZE)
    assert hashlib.sha256(overlay_img.read_bytes()).hexdigest() == digest


@pytest.mark.root
def test_file_swapped_under_the_fd_is_never_checked(overlay_img: Path, tmp_path: Path) -> None:
    """The caller validated an fd; a different file now sits at the path."""
    require_root()
    sh("debugfs", "-w", "-R", "ssv state 0", str(overlay_img))
    decoy = tmp_path / "decoy.img"
    shutil.copyfile(overlay_img, decoy)
    decoy_digest = hashlib.sha256(decoy.read_bytes()).hexdigest()
    fd = os.open(overlay_img, os.O_RDONLY)
    try:
        os.rename(decoy, overlay_img)  # the validated inode is now only reachable by fd
        result = ext3.replay_and_fsck(overlay_img, 0, SIZE, fd=fd)
        assert result.checked and ext3.Superblock.read(fd).is_clean  # the fd's inode was checked
    finally:
        os.close(fd)
    assert hashlib.sha256(overlay_img.read_bytes()).hexdigest() == decoy_digest  # the name's file never was
    assert ext3.Superblock.read(overlay_img).is_dirty
    assert sh("losetup", "--associated", str(overlay_img)).stdout == ""


@pytest.mark.root
def test_fd_variant_repairs_through_the_fd(overlay_img: Path) -> None:
    require_root()
    sh("debugfs", "-w", "-R", "ssv state 0", str(overlay_img))
    fd = os.open(overlay_img, os.O_RDONLY)
    try:
        result = ext3.replay_and_fsck(overlay_img, 0, SIZE, fd=fd)
        assert result.checked and ext3.Superblock.read(fd).is_clean
    finally:
        os.close(fd)
