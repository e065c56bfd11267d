"""The runtime API directly: assemble / teardown / find_leftovers, the state record,
the dirty-ext3 check before a rw mount, and a lease lock handed to the ext3 daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay.engine import lease
from sifoverlay.errors import OverlayStateError
from sifoverlay.ext3 import Superblock
from sifoverlay.runtime import assemble, find_leftovers, mounts, teardown

from . import images
from .conftest import Env, assert_clean

pytestmark = pytest.mark.root
MODES = ["fuse", "kernel"]


@pytest.mark.parametrize("mode", MODES)
def test_assemble_records_state_and_teardown_reverses(env: Env, mode: str) -> None:
    rootfs = assemble(env.image, "job-7", writable=True, mode=mode, uid=env.user.uid, gid=env.user.gid,
                      base_dir=env.base)
    try:
        job = env.base / "job-7"
        assert (rootfs.path, rootfs.job_id, rootfs.mode, rootfs.writable) == (str(job / "rootfs"), "job-7", mode, True)
        assert {"bin", "etc", "tmp"} <= set(os.listdir(rootfs.path))
        record = json.loads((job / "state.json").read_text())
        assert [s["name"] for s in record["steps"]] == ["layer.0", "ext3", "rootfs"]
        assert {s["status"] for s in record["steps"]} == {"mounted"}
        assert record["image_ino"] == os.stat(env.image).st_ino and record["uid"] == env.user.uid
        if mode == "fuse":
            owners = {s["name"]: int(open(f"/proc/{s['pid']}/status").read().split("Uid:")[1].split()[0])
                      for s in record["steps"]}
            assert owners == {"layer.0": env.user.uid, "ext3": env.user.uid, "rootfs": env.user.uid}
        else:
            assert all(s["loop"].startswith("/dev/loop") for s in record["steps"][:2])
        assert mounts.mounts_under(str(job)) == [str(job / "rootfs"), str(job / "ext3"), str(job / "layer.0")]
        assert find_leftovers(env.base) == ["job-7"]
    finally:
        report = teardown("job-7", base_dir=env.base)
    assert report.unmounted == (str(job / "rootfs"), str(job / "ext3"), str(job / "layer.0"))
    assert report.signalled == () and report.removed
    assert find_leftovers(env.base) == []


@pytest.mark.parametrize("mode", MODES)
def test_image_without_overlay(env: Env, rootfs_tree: Path, mode: str) -> None:
    plain = images.build_image(rootfs_tree, env.dir / "plain.oci.sif", env.dir / "j",
                               owner=(env.user.uid, env.user.gid), overlay=False)
    with pytest.raises(OverlayStateError) as exc:
        assemble(plain, "rw-1", writable=True, mode=mode, uid=env.user.uid, gid=env.user.gid, base_dir=env.base)
    assert str(exc.value) == (f"{plain}: --writable needs an ext3 overlay and this image has none "
                              "(add one with: sifoverlay overlay create)")
    assert find_leftovers(env.base) == []
    rootfs = assemble(plain, "ro-1", writable=False, mode=mode, uid=env.user.uid, gid=env.user.gid, base_dir=env.base)
    try:
        record = json.loads((env.base / "ro-1" / "state.json").read_text())
        assert [s["name"] for s in record["steps"]] == ["layer.0", "scratch", "rootfs"]
        assert os.path.isfile(os.path.join(rootfs.path, "bin", "busybox"))
    finally:
        teardown(rootfs.job_id, base_dir=env.base)


@pytest.mark.parametrize("mode", MODES)
def test_dirty_ext3_is_checked_before_a_rw_mount(env: Env, mode: str) -> None:
    offset, size = images.overlay_region(env.image)
    images.poke(env.image, offset + 1024 + 58, b"\0\0")  # s_state: not clean (fuse2fs killed mid-run)
    assert Superblock.read(str(env.image), offset, size=size).is_dirty
    res = env.exec("--mount", mode, "-w", str(env.image), "--", "sh", "-c", "echo ok > /tmp/after-fsck")
    assert res.returncode == 0, res.stderr
    assert not Superblock.read(str(env.image), offset, size=size).is_dirty
    again = env.exec("--mount", mode, str(env.image), "--", "cat", "/tmp/after-fsck")
    assert (again.returncode, again.stdout) == (0, "ok\n")


def test_lease_lock_lives_with_the_ext3_daemon(env: Env) -> None:
    offset, size = images.overlay_region(env.image)
    held = lease.acquire(env.image, lease.Holder.current("slurm-42", "slurm"), region=(offset, size))
    rootfs = assemble(env.image, "slurm-42", writable=True, uid=env.user.uid, gid=env.user.gid, base_dir=env.base,
                      hold_fds=[held.lock_fd])
    try:
        held.unlock_range()  # the "Prolog" exits; fuse2fs keeps the description open
        probe = [sys.executable, "-c",
                 "import fcntl,os,struct,sys; fd=os.open(sys.argv[1], os.O_RDWR);"
                 "fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, int(sys.argv[2]), int(sys.argv[3]), 0))",
                 str(env.image), str(offset), str(size)]
        assert subprocess.run(probe, capture_output=True).returncode != 0  # still locked
    finally:
        teardown(rootfs.job_id, base_dir=env.base)
    assert subprocess.run(probe, capture_output=True).returncode == 0  # gone with the daemon
    assert held.release() is True
    assert_clean(env)
