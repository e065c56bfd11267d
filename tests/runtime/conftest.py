"""Fixtures for the runtime tests (root): FUSE usable by ordinary users, a throw-away
test user, the busybox test images, a world-traversable runtime dir. Every fixture
restores what it changed; `clean` checks that nothing is left mounted or attached."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sifoverlay.engine import sessions
from sifoverlay.runtime import mounts
from tests.conftest import require_root, require_tool

from . import images

TOOLS = ("squashfuse", "fuse2fs", "fuse-overlayfs", "fusermount3", "mksquashfs", "unsquashfs", "mkfs.ext3",
         "e2fsck", "useradd", "userdel", "mount", "umount", "losetup")


@pytest.fixture(scope="session")
def fuse_for_users() -> Iterator[None]:
    """chmod 666 /dev/fuse and `user_allow_other` in /etc/fuse.conf, restored afterwards."""
    require_root()
    require_tool(*TOOLS)
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    conf = Path(mounts.FUSE_CONF)
    before = conf.read_text() if conf.exists() else None
    os.chmod("/dev/fuse", 0o666)
    if not mounts.user_allow_other():
        conf.write_text((before or "") + "\nuser_allow_other\n")
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)
        if before is None:
            conf.unlink(missing_ok=True)
        elif conf.read_text() != before:
            conf.write_text(before)


@dataclass(frozen=True)
class TestUser:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="session")
def user(fuse_for_users: None) -> Iterator[TestUser]:
    name = f"sifort{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield TestUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        # FUSE daemons of a failed test may outlive it: stop them (by pid) so userdel works
        found = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout.split()
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        gone = subprocess.run(["userdel", name], check=False, capture_output=True, text=True)
        assert gone.returncode == 0, f"userdel {name}: {gone.stderr.strip()}"
        assert not found, f"test user processes were left running: {found}"


@pytest.fixture(scope="session")
def scratch(user: TestUser) -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp dirs are 0700 root: the test user's
    fusermount could not reach mount points there)."""
    path = Path(tempfile.mkdtemp(prefix="sifoverlay-rt-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        left = mounts.mounts_under(str(path))
        for target in left:
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(path, ignore_errors=True)
        assert not left, f"tests left mounts behind: {left}"


@pytest.fixture(scope="session")
def rootfs_tree(busybox_image: Path, scratch: Path, user: TestUser) -> Path:
    work = scratch / "build"
    work.mkdir()
    return images.busybox_rootfs(busybox_image, work)


@pytest.fixture(scope="session")
def golden_image(rootfs_tree: Path, scratch: Path, user: TestUser) -> Path:
    """Busybox + 64 MiB overlay, owned by the test user. Tests work on copies."""
    return images.build_image(rootfs_tree, scratch / "golden.oci.sif", scratch / "build-journal",
                              owner=(user.uid, user.gid))


@pytest.fixture(scope="session")
def loop_image(rootfs_tree: Path, scratch: Path, user: TestUser) -> Path:
    tree = images.clone_tree(rootfs_tree, scratch / "loop-rootfs")
    images.add_symlink_loops(tree)
    return images.build_image(tree, scratch / "symlink-loop.oci.sif", scratch / "build-journal",
                              owner=(user.uid, user.gid))


@dataclass
class Env:
    dir: Path
    base: Path
    journal: Path
    image: Path
    user: TestUser

    def argv(self, *args: str, user: str | None = None) -> list[str]:
        return [sys.executable, "-m", "sifoverlay", "exec", "--allow-root-options", "--base-dir", str(self.base), "--journal-dir",
                str(self.journal), "-u", user if user is not None else self.user.name, *args]

    def exec(self, *args: str, user: str | None = None, cwd: str = "/", timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        """`sifoverlay exec ARGS` (ARGS include the image, "--" and the command)."""
        return subprocess.run(self.argv(*args, user=user), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, stdin=subprocess.DEVNULL)


@pytest.fixture
def env(scratch: Path, golden_image: Path, user: TestUser) -> Iterator[Env]:
    directory = Path(tempfile.mkdtemp(prefix="t-", dir=scratch))
    directory.chmod(0o755)
    image = images.copy_image(golden_image, directory / "img.oci.sif")
    e = Env(directory, directory / "run", directory / "journal", image, user)
    try:
        yield e
        # every run closed its session and released its lease (reader or writer)
        assert sessions.open_sessions(e.journal) == []
        assert [n for n in os.listdir(directory) if "sifoverlay-lease" in n] == []
    finally:
        assert_clean(e)
        shutil.rmtree(directory, ignore_errors=True)


def assert_clean(e: Env) -> None:
    """Nothing mounted under the runtime dir, no loop device on the test's images, no
    FUSE daemon of the test user left, no runtime directory."""
    assert mounts.mounts_under(str(e.dir)) == []
    lo = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(e.dir) not in lo, lo
    daemons = subprocess.run(["pgrep", "-u", str(e.user.uid), "-a"], capture_output=True, text=True).stdout
    assert not [line for line in daemons.splitlines() if str(e.dir) in line], daemons
    assert not e.base.exists() or list(e.base.iterdir()) == []
