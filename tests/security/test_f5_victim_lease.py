"""Finding 5: another user's image held for a year.

(a) The attacker swaps a directory component of her own image path for a symlink into
    the victim's directory, from outside, while her jobs start and end: root used to
    create the lease file beside "her" image, i.e. in the victim's directory, and the
    victim's own rw job was then refused as busy.
(b) Anyone with read access took an OFD read lock on the victim's image (or a reader
    lease) and held it forever: the owner's writer was refused.

Now lease records live in the root state directory keyed by the image's identity, the
image's directory is resolved without following symlinks, and read locks of other users
without a reader lease of a live job do not block the owner's writer.
Each test: the victim's image is byte-for-byte unchanged (sha256, mtime), nothing is
created in the victim's directory, every job ends within its limit, the node never
drains, and the victim's next rw job runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.security.h3_support import (
    PKG_PYTHON, assert_node_not_drained, flipping, outdir_for, snapshot, submit, sweep, user_dir, victim_rw_job_runs, wait_all,
)
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

JOBS = 8


def test_directory_component_swap_never_leases_the_victims_dir(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    alice, bob = slurm_users
    outdir = outdir_for(image_dir)
    home_a = user_dir(image_dir, "alice", alice)
    home_b = user_dir(image_dir, "bob", bob)
    sub = user_dir(home_a, "sub", alice)
    mine = make_image(alice, "img.sif", where=sub)
    victim = make_image(bob, "img.sif", where=home_b)  # same file name as the attacker's
    os.symlink(home_b, home_a / "evil")
    os.lchown(home_a / "evil", alice.uid, alice.gid)
    before, listing = snapshot(victim), sorted(os.listdir(home_b))
    jobs: list[int] = []
    with flipping(alice, sub, home_a / "evil"):
        for _ in range(JOBS):
            job = submit(cluster, alice, mine, outdir, command="sleep 0.5")
            if job is not None:
                jobs.append(job)
            time.sleep(0.3)
        wait_all(cluster, jobs)
    sweep(cluster)
    assert jobs, "no job could even be submitted"
    assert sorted(os.listdir(home_b)) == listing, "root created files in the victim's directory"
    assert snapshot(victim) == before
    assert_node_not_drained(cluster)
    victim_rw_job_runs(cluster, bob, victim, outdir)


READ_LOCKER = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))  # F_OFD_SETLK, whole file
print("locked", flush=True)
time.sleep(3600)
"""


def test_a_readers_lock_does_not_block_the_owners_writer(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    alice, bob = slurm_users
    outdir = outdir_for(image_dir)
    home_b = user_dir(image_dir, "bob", bob)
    victim = make_image(bob, "img.sif", where=home_b)  # 0644: alice may read it
    before = snapshot(victim)
    locker = subprocess.Popen(["runuser", "-u", alice.name, "--", "/usr/bin/python3", "-c", READ_LOCKER, str(victim)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        assert snapshot(victim) == before
        victim_rw_job_runs(cluster, bob, victim, outdir)  # refused as busy before the fix
    finally:
        locker.kill()
        locker.wait()
    assert_node_not_drained(cluster)


def test_unprivileged_cli_sees_a_jobs_lease_and_refuses_to_write(
    cluster: Cluster, slurm_users: tuple[User, User], imported_image: Path, tmp_path: Path,
) -> None:
    """The root state directory is world-readable, its records 0644: an unprivileged
    `sifoverlay overlay sync` of the owner sees that a job (on another node: no byte-range
    lock here) holds her image and refuses (exit 75 naming the job); she cannot create or
    remove anything there; her own records go to her per-user state directory. The CLI
    is the installed package's (the `cluster` fixture installs it from this tree)."""
    import shutil
    import stat
    import tempfile

    from sifoverlay.engine import create_overlay, lease

    alice, _ = slurm_users
    base = Path(tempfile.mkdtemp(prefix="sifo-h3-cli-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        root_state = base / "rootstate"
        root_state.mkdir(mode=0o755)
        home = user_dir(base, "alice", alice)
        image = home / "img.sif"
        shutil.copyfile(imported_image, image)
        create_overlay(image, size_mib=64, sparse=True, uid=alice.uid, gid=alice.gid, journal_dir=str(base / "j"))
        os.chown(image, alice.uid, alice.gid)
        held = lease.acquire(image, lease.Holder("othernode", 4242, "777", "slurm", uid=alice.uid), ttl=3600,
                             state_dir=str(root_state))
        held.unlock_range()  # as if held on another node: only the record tells
        record = Path(held.file_path)
        assert record.parent.parent == root_state and stat.S_IMODE(record.stat().st_mode) == 0o644
        assert not [n for n in os.listdir(home) if n != "img.sif"], "nothing is written beside the image"
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home),
               "SIFOVERLAY_ROOT_STATE_DIR": str(root_state), "XDG_STATE_HOME": str(home / ".state")}
        cmd = ["runuser", "-u", alice.name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
               PKG_PYTHON, "-m", "sifoverlay"]
        done = subprocess.run([*cmd, "overlay", "sync", "--force-hash", str(image)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 75, (done.stdout, done.stderr)
        assert "job 777 (slurm) on host othernode" in done.stderr, done.stderr
        touched = subprocess.run(["runuser", "-u", alice.name, "--", "touch", str(root_state / "leases" / "x")],
                                 capture_output=True)
        assert touched.returncode != 0, "the user could write root's state directory"
        held.release()
        done = subprocess.run([*cmd, "overlay", "sync", "--force-hash", str(image)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert (home / ".state" / "sifoverlay").is_dir(), "per-user state directory used"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_status_verify_reads_under_a_shared_lease(imported_image: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers hold a lease too: `status --verify` hashes under a reader lease (visible to
    writers while it runs, gone after), and reports in-use without hashing while a writer
    holds the image."""
    import shutil

    from sifoverlay import engine
    from sifoverlay.engine import create_overlay, lease

    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))
    image = tmp_path / "img.sif"
    shutil.copyfile(imported_image, image)
    create_overlay(image, size_mib=64, sparse=True, journal_dir=str(tmp_path / "j"))
    seen: list[int] = []
    result = engine.status(image, verify=True, progress=lambda done, total: seen.append(len(lease.readers(image))))
    assert result.state == "clean" and seen and all(n == 1 for n in seen)
    assert lease.readers(image) == []
    with lease.acquire(image, lease.Holder("othernode", 1, "9", "slurm"), ttl=3600) as held:
        held.unlock_range()  # another node's writer: only its record says so
        busy = engine.status(image, verify=True)
    assert busy.state == "in-use" and busy.actual_digest is None and "job 9" in str(busy.holder)
