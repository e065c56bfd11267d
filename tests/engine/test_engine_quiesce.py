"""quiesce: FUSE mounts, loop devices and byte-range locks over the overlay are seen."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine import quiesce
from sifoverlay.errors import ImageBusy
from tests.conftest import require_root, require_tool
from tests.engine.conftest import assert_consistent, debugfs_cat, modify_overlay, region, sh


@contextmanager
def posix_lock_child(image: Path, offset: int, size: int, *, shared: bool) -> Iterator[subprocess.Popen[str]]:
    """A child holding a POSIX lockf() lock over [offset, offset+size) (what SingularityCE
    native mode takes) until the block ends."""
    mode, op = ("O_RDONLY", "LOCK_SH") if shared else ("O_RDWR", "LOCK_EX")
    child = subprocess.Popen(
        [sys.executable, "-c",
         f"import fcntl,os,sys; fd=os.open(sys.argv[1], os.{mode}); "
         f"fcntl.lockf(fd, fcntl.{op}|fcntl.LOCK_NB, int(sys.argv[3]), int(sys.argv[2])); "
         "print('locked', flush=True); sys.stdin.readline()", str(image), str(offset), str(size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        yield child
    finally:
        child.communicate("\n", timeout=30)


def test_mountinfo_sources_are_matched_by_inode(tmp_path: Path) -> None:
    image = tmp_path / "my image.sif"
    image.write_bytes(b"x")
    other = tmp_path / "other.sif"
    other.write_bytes(b"y")
    escaped = str(image).replace(" ", "\\040")
    info = tmp_path / "mountinfo"
    owner = image.stat().st_uid
    info.write_text(
        f"36 35 0:50 / /mnt/a rw,nosuid,nodev,relatime shared:1 - fuse.fuse2fs {escaped} rw,user_id=0\n"
        f"37 35 0:51 / /mnt/b ro,relatime - fuse.ext4 {escaped} ro,user_id={owner},group_id=0\n"
        f"38 35 0:52 / /mnt/c ro,relatime - fuse.squashfuse {escaped} ro,user_id=4242\n"
        f"39 35 0:53 / /mnt/d rw,relatime - fuse.fuse2fs {other} rw,user_id=0\n"
        f"40 35 0:55 / /mnt/e rw,relatime - fuse.fuse2fs {escaped} rw\n"
        f"41 35 0:56 / /mnt/f rw,relatime - fuse.fuse2fs {escaped} rw,user_id=31337\n"
        "42 35 0:54 / /proc rw - proc proc rw\n"
    )
    found = quiesce.fuse_mounts(os.stat(image), str(info))
    # /mnt/e (no owner) and /mnt/f (somebody else's FUSE named after the image) are not
    # evidence; /mnt/c becomes evidence when its mounter is the job user
    assert [(a.kind, a.writer) for a in found] == [("fuse", True), ("fuse", False)]
    assert found[0].detail == "fuse2fs mount at /mnt/a (rw)"
    with_job = quiesce.fuse_mounts(os.stat(image), str(info), owners=[4242])
    assert [(a.kind, a.writer) for a in with_job] == [("fuse", True), ("fuse", False), ("fuse-layer", False)]


def test_posix_lock_of_another_process_blocks_sync(overlay_image: Path, tmp_path: Path) -> None:
    """SingularityCE native mode takes F_SETLK over the ext3 range; we must see it."""
    modify_overlay(overlay_image, tmp_path)
    offset, size = region(overlay_image)
    with posix_lock_child(overlay_image, offset, size, shared=False) as child:
        [activity] = quiesce.find_activity(str(overlay_image), offset, size)
        assert (activity.kind, activity.writer) == ("lock", True)
        assert f"pid {child.pid}" in activity.detail
        with pytest.raises(ImageBusy, match=f"pid {child.pid}"):
            engine.sync(overlay_image)
        assert engine.status(overlay_image).state == "in-use"
    assert quiesce.find_activity(str(overlay_image), offset, size) == []
    assert engine.sync(overlay_image).action == "reconciled"


@pytest.mark.root
def test_fuse2fs_rw_mount_is_in_use_then_reconciled(overlay_image: Path, tmp_path: Path) -> None:
    require_root()
    require_tool("fuse2fs", "fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    offset, _ = region(overlay_image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(["fuse2fs", "-f", "-o", f"fakeroot,offset={offset}", str(overlay_image), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        (mnt / "upper" / "fuse.txt").write_text("via fuse2fs\n")
        st = engine.status(overlay_image)
        assert st.state == "in-use" and f"fuse2fs pid {proc.pid} has the image open (rw)" == st.holder["detail"]  # type: ignore[index]
        mounts = quiesce.fuse_mounts(os.stat(overlay_image))
        assert [(a.kind, a.detail) for a in mounts] == [("fuse", f"ext4 mount at {mnt} (rw)")]
        with pytest.raises(ImageBusy, match="fuse2fs pid"):
            engine.sync(overlay_image)
    finally:
        sh("fusermount3", "-u", str(mnt), check=False)
        proc.wait(timeout=30)
    assert engine.status(overlay_image).state == "modified"
    result = engine.sync(overlay_image)
    assert result.action in ("reconciled", "replayed-and-reconciled")
    assert_consistent(overlay_image)
    assert debugfs_cat(overlay_image, "upper/fuse.txt") == b"via fuse2fs\n"


def test_own_lease_lock_is_not_activity_but_others_are(overlay_image: Path, tmp_path: Path) -> None:
    """engine.sync(job=) runs inside the job's lease while this process still holds its
    byte-range lock: that lock is ignored, any other lock is not."""
    from sifoverlay.engine import lease

    modify_overlay(overlay_image, tmp_path)
    offset, size = region(overlay_image)
    path = str(overlay_image)
    held = lease.acquire(path, lease.Holder.current("job-own"), region=(offset, size))
    try:
        seen = quiesce.find_activity(path, offset, size)
        assert sorted(a.kind for a in seen) == ["lease", "lock"]
        assert [a.detail for a in seen if a.kind == "lock"] == [
            f"write lock on the overlay held by {held.info.describe()}"]
        assert quiesce.find_activity(path, offset, size, job="job-own") == []
        assert quiesce.find_activity(path, offset, size, own_lease=held) == []
        assert [a.kind for a in quiesce.find_activity(path, offset, size, job="job-other")] == ["lock", "lease"]
        assert lease.held_lock_fd(path, "job-own") == held.lock_fd
        assert lease.held_lock_fd(path, "job-other") is None
        result = engine.sync(overlay_image, job="job-own")  # the lock stays held throughout
        assert result.action == "reconciled"
        assert lease.inspect(path) is not None and lease.inspect(path).token == held.token  # type: ignore[union-attr]
    finally:
        held.release()
    assert lease.held_lock_fd(path, "job-own") is None
    assert_consistent(overlay_image)


def test_own_lease_does_not_hide_a_foreign_posix_lock(overlay_image: Path) -> None:
    from sifoverlay.engine import lease

    offset, size = region(overlay_image)
    path = str(overlay_image)
    held = lease.acquire_shared(path, lease.Holder.current("job-ro"), region=(offset, size))
    try:
        with posix_lock_child(overlay_image, offset, size, shared=True) as child:
            # Any user (writers_only=False): our own read lock is exempt, the child's is not.
            [activity] = quiesce.find_activity(path, offset, size, writers_only=False, own_lease=held)
            assert (activity.kind, activity.writer) == ("lock", False)
            assert activity.detail == f"read lock on the overlay held by pid {child.pid}"
    finally:
        held.release()
    assert quiesce.find_activity(path, offset, size, writers_only=False) == []


def _fake_daemon(proc: Path, pid: int, comm: str, uid: int, argv: list[str]) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_a_descriptor_source_is_judged_by_its_daemon_not_by_our_own_fd(tmp_path: Path) -> None:
    """The runtime mounts the ext3 as `fuse2fs /proc/self/fd/N TARGET`: mountinfo then names
    the MOUNTER's descriptor N. stat()ing that name here looked at OUR fd N, so another
    job's mount of another image counted as a writer of ours whenever our image happened to
    be our fd N: on the 3-node bed a reconcile worker failed with 'overlay in use' that way
    (and the next writer of its image was refused)."""
    image = tmp_path / "img.sif"
    image.write_bytes(b"x")
    fd = os.open(image, os.O_RDONLY)  # our descriptor N of our image
    try:
        info = tmp_path / "mountinfo"
        info.write_text(
            f"36 35 0:50 / /run/m/35/ext3 rw,relatime - fuse.ext4 /proc/self/fd/{fd} rw,user_id=0\n"
            f"37 35 0:51 / /run/m/42/ext3 rw,relatime - fuse.ext4 /proc/self/fd/{fd} rw,user_id=0\n")
        proc = tmp_path / "proc"
        # the daemon of job 35's mount is visible (and serves another image: fuse_processes
        # would say so from its fdinfo); job 42's is not (another pid namespace)
        _fake_daemon(proc, 5001, "fuse2fs", 0, ["fuse2fs", "-f", f"/proc/self/fd/{fd}", "/run/m/35/ext3", "-o", "ro"])
        _fake_daemon(proc, 5002, "sleep", 0, ["sleep", "/run/m/42/ext3"])  # not a FUSE daemon
        found = quiesce.fuse_mounts(os.stat(image), str(info), proc=str(proc))
        assert [a.detail for a in found] == ["ext4 mount at /run/m/42/ext3 (rw)"]
        # a daemon of an untrusted uid does not make a mount go away
        _fake_daemon(proc, 5003, "fuse2fs", 31337, ["fuse2fs", "-f", "/proc/self/fd/3", "/run/m/42/ext3"])
        assert [a.detail for a in quiesce.fuse_mounts(os.stat(image), str(info), proc=str(proc))] == \
            ["ext4 mount at /run/m/42/ext3 (rw)"]
        _fake_daemon(proc, 5004, "fuse2fs", 0, ["fuse2fs", "-f", "/proc/self/fd/3", "/run/m/42/ext3"])
        assert quiesce.fuse_mounts(os.stat(image), str(info), proc=str(proc)) == []
    finally:
        os.close(fd)
