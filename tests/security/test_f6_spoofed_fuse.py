"""Issue 12, finding 6: quiesce (what engine.sync in the Epilog, seal and status ask "is
anyone writing this overlay?") trusted the fsname in mountinfo and a process's name.

An attacker (another real user) mounts her own FUSE filesystem with
``fsname=<victim image>,subtype=fuse2fs``, runs a process named ``fuse2fs`` holding the
victim's (world-readable) image open, and stops her daemon so that a root stat() of her
mount point never returns. None of that may count as activity on the victim's image or
block root; the victim's own fuse2fs mount still does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.engine import quiesce
from sifoverlay.runtime import mounts
from tests.conftest import require_tool
from tests.runtime.conftest import fuse_for_users  # noqa: F401  (fixture)

from .h4_support import RealUser, real_user

pytestmark = pytest.mark.root
SIZE = 64 << 20


def _as(user: RealUser, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, user=user.uid, group=user.gid, extra_groups=[], cwd="/",
                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)  # type: ignore[call-overload]


def _wait_mounted(target: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not mounts.is_mounted(str(target)):
        assert proc.poll() is None and time.monotonic() < deadline, "FUSE daemon did not mount"
        time.sleep(0.05)


@pytest.fixture
def world(fuse_for_users: None) -> Iterator[tuple[Path, RealUser, RealUser]]:
    """(directory, victim, attacker): the victim's ext3 image victim.img (0644, hers) in a
    world-traversable directory."""
    require_tool("squashfuse", "fuse2fs", "fusermount3", "mksquashfs", "useradd")
    directory = Path(tempfile.mkdtemp(prefix="sifsec-f6-", dir="/tmp"))
    directory.chmod(0o755)
    with real_user("sifvic") as victim, real_user("sifatk") as attacker:
        image = directory / "victim.img"
        ext3.make_overlay_fs(image, SIZE >> 20, sparse=True, uid=victim.uid, gid=victim.gid)
        os.chown(image, victim.uid, victim.gid)
        os.chmod(image, 0o644)
        try:
            yield directory, victim, attacker
        finally:
            for target in mounts.mounts_under(str(directory)):
                subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(directory, ignore_errors=True)


def _activity_in_child(image: Path, *, writers_only: bool, timeout: float = 60) -> tuple[float, list[str]]:
    """quiesce as root, in a child (it must not block: bounded by `timeout`)."""
    code = ("import sys; from sifoverlay.engine import quiesce\n"
            "for a in quiesce.find_activity(sys.argv[1], 0, int(sys.argv[2]), writers_only=sys.argv[3] == '1'):\n"
            "    print(a.kind, a.writer, a.detail)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(image), str(SIZE), "1" if writers_only else "0"],
                          capture_output=True, text=True, timeout=timeout, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - start, proc.stdout.splitlines()


def test_spoofed_fsname_and_fake_daemon_are_not_writers(world: tuple[Path, RealUser, RealUser]) -> None:
    directory, victim, attacker = world
    image = directory / "victim.img"
    before = (image.read_bytes(), image.stat().st_mtime_ns)
    # the attacker's own squashfs, mounted under the victim image's name
    src = directory / "atk-src"
    src.mkdir()
    (src / "x").write_text("x")
    sq = directory / "atk.sqfs"
    subprocess.run(["mksquashfs", str(src), str(sq), "-quiet", "-no-progress"], check=True, capture_output=True)
    os.chown(sq, attacker.uid, attacker.gid)
    mnt = directory / "atk-mnt"
    mnt.mkdir()
    os.chown(mnt, attacker.uid, attacker.gid)
    daemon = _as(attacker, ["squashfuse", "-f", "-o", f"fsname={image},subtype=fuse2fs,allow_other", str(sq), str(mnt)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fake = None
    try:
        _wait_mounted(mnt, daemon)
        entry = next(e for e in mounts.mountinfo() if e.target == str(mnt))
        assert (entry.fstype, entry.source) == ("fuse.fuse2fs", str(image))  # the spoof is in place
        # a process named fuse2fs with the victim's image open (read access is enough)
        fake_bin = directory / "bin"
        fake_bin.mkdir()
        shutil.copy("/usr/bin/sleep", fake_bin / "fuse2fs")
        fake = _as(attacker, ["sh", "-c", f"exec 3<'{image}'; exec '{fake_bin / 'fuse2fs'}' 600"])
        deadline = time.monotonic() + 10
        while _read_comm(fake.pid) != "fuse2fs":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(daemon.pid, signal.SIGSTOP)  # root's stat() of her mount point would never return
        took, seen = _activity_in_child(image, writers_only=True)
        assert seen == [] and took < 20
        took, seen = _activity_in_child(image, writers_only=False)  # seal: any user counts
        assert seen == [] and took < 20
        quiesce.ensure_quiet(str(image), 0, SIZE, writers_only=False)  # in-process, no ImageBusy
    finally:
        if fake is not None:
            fake.kill()
            fake.wait()
        os.kill(daemon.pid, signal.SIGCONT)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        daemon.kill()
        daemon.wait()
    assert (image.read_bytes(), image.stat().st_mtime_ns) == before


def test_victims_own_fuse2fs_is_still_a_writer(world: tuple[Path, RealUser, RealUser]) -> None:
    directory, victim, _ = world
    image = directory / "victim.img"
    mnt = directory / "vic-mnt"
    mnt.mkdir()
    os.chown(mnt, victim.uid, victim.gid)
    daemon = _as(victim, ["fuse2fs", "-f", "-o", "fakeroot", str(image), str(mnt)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_mounted(mnt, daemon)
        took, seen = _activity_in_child(image, writers_only=True)
        assert seen == [f"fuse True fuse2fs pid {daemon.pid} has the image open (rw)"], seen
        with pytest.raises(Exception, match="overlay in use: fuse2fs pid"):
            quiesce.ensure_quiet(str(image), 0, SIZE)
        # the same daemon seen from its mount entry alone (no daemon visible: other pid ns)
        assert [(a.kind, a.writer) for a in quiesce.fuse_mounts(image.stat())] == [("fuse", True)]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        daemon.wait(timeout=30)


def _read_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
