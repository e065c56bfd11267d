"""Finding 6 against the real Epilog on the dev cluster: the attacker (alice) mounts her
own FUSE filesystem named after the victim's (bob's) image (``fsname=<bob's image>,
subtype=fuse2fs,allow_other``), keeps a process named ``fuse2fs`` holding bob's
world-readable image open, and stops her daemon. Bob's rw job writes; his Epilog must
still reconcile (a spoofed "writer" used to leave it unreconciled, and a root stat() of
her stopped mount would hang it), within the job's limit, without draining the node; his
next job sees the data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sifoverlay.runtime import mounts
from tests.security.h3_support import JOB_LIMIT_MIN, assert_node_not_drained, outdir_for, submit, user_dir
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)
from tests.slurm.test_jobs import assert_reconciled, srun_in

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]


def test_spoofed_fuse_mount_does_not_block_the_victims_epilog(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    alice, bob = slurm_users
    outdir = outdir_for(image_dir)
    home_a = user_dir(image_dir, "alice", alice)
    victim = make_image(bob, "victim.sif", mode=0o644)
    src = home_a / "src"
    src.mkdir()
    (src / "x").write_text("x")
    sq = home_a / "atk.sqfs"
    subprocess.run(["mksquashfs", str(src), str(sq), "-quiet", "-no-progress"], check=True, capture_output=True)
    mnt = home_a / "mnt"
    mnt.mkdir()
    fake = home_a / "fuse2fs"
    shutil.copy("/usr/bin/sleep", fake)
    subprocess.run(["chown", "-R", f"{alice.uid}:{alice.gid}", str(home_a)], check=True)
    daemon = subprocess.Popen(["runuser", "-u", alice.name, "--", "squashfuse", "-f", "-o",
                               f"fsname={victim},subtype=fuse2fs,allow_other", str(sq), str(mnt)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    holder = subprocess.Popen(["runuser", "-u", alice.name, "--", "sh", "-c", f"exec 3<'{victim}'; exec '{fake}' 900"],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not mounts.is_mounted(str(mnt)):
            assert daemon.poll() is None and time.monotonic() < deadline, "attacker's squashfuse did not mount"
            time.sleep(0.05)
        entry = next(e for e in mounts.mountinfo() if e.target == str(mnt))
        assert (entry.fstype, entry.source) == ("fuse.fuse2fs", str(victim))
        squashfuse = subprocess.run(["pgrep", "-u", str(alice.uid), "-x", "squashfuse"], capture_output=True,
                                    text=True).stdout.split()
        assert squashfuse
        for pid in squashfuse:
            os.kill(int(pid), signal.SIGSTOP)
        job = submit(cluster, bob, victim, outdir, command="echo bob-wrote > /bob.txt")
        assert job is not None
        state = cluster.wait_finished(job, timeout=JOB_LIMIT_MIN * 60 + 60)
        out = outdir / f"{job}.out"
        assert state == "COMPLETED", (state, out.read_text() if out.exists() else "")
        assert_node_not_drained(cluster)
        assert_reconciled(cluster, victim, job)  # the Epilog did not take her mount for a writer
    finally:
        for pid in subprocess.run(["pgrep", "-u", str(alice.uid), "-x", "squashfuse"], capture_output=True,
                                  text=True).stdout.split():
            os.kill(int(pid), signal.SIGCONT)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        for proc in (daemon, holder):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = srun_in(cluster, bob, victim, "cat", "/bob.txt")
    assert (done.returncode, done.stdout) == (0, "bob-wrote\n"), done.stderr
