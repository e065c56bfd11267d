"""Issue 12, finding 4: clearing the clean bit (or leaving a journal to replay) in one's
own overlay used to make root attach a loop device (udev/blkid probe it) and run
``e2fsck -p`` as root on the attacker's metadata, in every rw Prolog/Epilog.

Now the check runs as an unprivileged process (the job user, else the image owner,
never uid 0) with no capabilities and no_new_privs, on a private copy of the region;
no loop device and no losetup. Wrappers around e2fsck/losetup/dumpe2fs record who ran
them. The real journal replay still works and nothing outside the region changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.ext3 import tools
from tests.conftest import require_root, require_tool
from tests.ext3.conftest import kernel_mount, sh

from .h4_support import RealUser, calls, real_user, tool_spies

pytestmark = pytest.mark.root
MIB = 1 << 20
OFFSET = 2 * MIB + 12345
SIZE = 64 * MIB
TAIL = 3001


@pytest.fixture
def owner() -> Iterator[RealUser]:
    require_root()
    require_tool("useradd", "userdel", "setpriv", "e2fsck", "debugfs", "mkfs.ext3")
    with real_user("sifown") as u:
        yield u


@pytest.fixture
def spies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    spy_dir = Path(f"/tmp/sifsec-spy-{os.getpid()}-{time.monotonic_ns()}")
    log = tool_spies(spy_dir, "e2fsck", "losetup", "dumpe2fs")
    monkeypatch.setattr(tools, "TOOL_PATH", f"{spy_dir}:{tools.TOOL_PATH}")
    monkeypatch.setenv("PATH", f"{spy_dir}:{os.environ.get('PATH', '')}")
    yield log
    shutil.rmtree(spy_dir, ignore_errors=True)


def _crash_image(tmp_path: Path) -> Path:
    """An ext3 with an un-checkpointed transaction in its journal (copied while mounted)."""
    fs = tmp_path / "overlay.img"
    ext3.make_overlay_fs(fs, 64, sparse=True)
    snap = tmp_path / "snap.img"
    with kernel_mount(fs, tmp_path / "mnt") as mnt:
        crash = mnt / "upper" / "crash"
        crash.mkdir()
        for i in range(3):
            (crash / f"f{i}").write_bytes(f"payload {i}\n".encode() * 100)
        time.sleep(6.5)  # > 5 s: jbd2 commits the transaction to the journal
        sh("cp", "--sparse=always", str(fs), str(snap))
    return snap


def _embed(fs: Path, big: Path, owner: RealUser) -> tuple[bytes, bytes]:
    head, tail = os.urandom(OFFSET), os.urandom(TAIL)
    with open(fs, "rb") as src, open(big, "wb") as dst:
        dst.write(head)
        shutil.copyfileobj(src, dst, 4 * MIB)
        dst.write(tail)
    os.chown(big, owner.uid, owner.gid)
    os.chmod(big, 0o644)
    return head, tail


def _outside(big: Path) -> tuple[bytes, bytes]:
    with open(big, "rb") as f:
        head = f.read(OFFSET)
        f.seek(OFFSET + SIZE)
        return head, f.read()


def _loops_on(big: Path) -> str:
    return subprocess.run(["/usr/sbin/losetup", "--associated", str(big)], capture_output=True, text=True).stdout


def _assert_unprivileged(log: Path, uid: int) -> None:
    seen = calls(log)
    assert seen, "no tool ran at all"
    for call in seen:
        name = os.path.basename(call.argv[0])
        assert name != "losetup", f"losetup ran: {call}"
        assert not any(a.startswith("/dev/loop") for a in call.argv), f"a loop device was checked: {call}"
        assert (call.uid, call.no_new_privs, call.cap_eff) == (uid, 1, 0), f"{name} ran privileged: {call}"


def test_dirty_overlay_is_replayed_by_its_owner_not_root(tmp_path: Path, owner: RealUser, spies: Path) -> None:
    big = tmp_path / "big.sif"
    tmp_path.chmod(0o755)
    head, tail = _embed(_crash_image(tmp_path), big, owner)
    spies.write_text("")  # the test's own kernel mount above used losetup
    assert ext3.Superblock.read(big, OFFSET, size=SIZE).needs_recovery
    fd = os.open(big, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        result = ext3.replay_and_fsck(big, OFFSET, SIZE, fd=fd)  # as root: Epilog/Prolog/engine.sync path
    finally:
        os.close(fd)
    assert result.replayed and result.checked and result.returncode in (0, 1)
    _assert_unprivileged(spies, owner.uid)
    assert _loops_on(big) == ""
    after = ext3.Superblock.read(big, OFFSET, size=SIZE)
    assert after.is_clean and not after.needs_recovery
    at = f"{big}?offset={OFFSET}"
    assert sh("debugfs", "-R", "cat /upper/crash/f2", at).stdout == "payload 2\n" * 100
    assert _outside(big) == (head, tail)  # only the region was written
    sh("e2fsck", "-fn", at)


def test_job_user_is_used_when_named(tmp_path: Path, owner: RealUser, spies: Path) -> None:
    """The runtime/Prolog name the job user: the check runs as that uid even for a
    root-owned image, and a root-owned image with no job user runs as nobody."""
    fs = tmp_path / "fs.img"
    ext3.make_overlay_fs(fs, 64, sparse=True)
    sh("debugfs", "-w", "-R", "ssv state 0", str(fs))  # the attacker's cleared clean bit
    os.chmod(fs, 0o666)
    result = ext3.replay_and_fsck(fs, 0, SIZE, as_user=(owner.uid, owner.gid))
    assert result.checked and ext3.Superblock.read(fs).is_clean
    _assert_unprivileged(spies, owner.uid)
    spies.write_text("")
    sh("debugfs", "-w", "-R", "ssv state 0", str(fs))
    os.chmod(fs, 0o600)  # root's own image: the child only has the descriptor it is given
    result = ext3.replay_and_fsck(fs, 0, SIZE)
    assert result.checked and ext3.Superblock.read(fs).is_clean
    _assert_unprivileged(spies, 65534)


def test_kernel_gate_runs_unprivileged_too(tmp_path: Path, owner: RealUser, spies: Path) -> None:
    fs = tmp_path / "fs.img"
    ext3.make_overlay_fs(fs, 64, sparse=True)
    os.chown(fs, owner.uid, owner.gid)
    result = ext3.replay_and_fsck(fs, 0, SIZE, check_only=True, as_user=(owner.uid, owner.gid))
    assert result.checked and result.returncode == 0
    _assert_unprivileged(spies, owner.uid)
    assert [os.path.basename(c.argv[0]) for c in calls(spies)] == ["dumpe2fs", "e2fsck"]


def test_a_stopped_checker_cannot_block_root(tmp_path: Path, owner: RealUser, spies: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner can SIGSTOP a process running as herself: root waits a bounded time."""
    from sifoverlay.errors import ExternalToolError

    fs = tmp_path / "fs.img"
    ext3.make_overlay_fs(fs, 64, sparse=True)
    sh("debugfs", "-w", "-R", "ssv state 0", str(fs))
    os.chown(fs, owner.uid, owner.gid)
    spy_dir = spies.parent
    (spy_dir / "e2fsck").write_text("#!/bin/sh\nkill -STOP $$\n")  # the owner's process stops itself
    start = time.monotonic()
    with pytest.raises(ExternalToolError, match="timed out after 3 s"):
        ext3.replay_and_fsck(fs, 0, SIZE, timeout=3)
    assert time.monotonic() - start < 20
    deadline = time.monotonic() + 10  # killed: gone once reaped
    while subprocess.run(["pgrep", "-u", str(owner.uid)], capture_output=True).stdout:
        assert time.monotonic() < deadline, "the owner's stopped checker survived"
        time.sleep(0.1)
