"""Real jobs through --oci-sif-overlay on the local cluster: the job runs inside the image,
writes land in the ext3 overlay, and however the job ends the image is reconciled
(digest recorded == sha256 of the ext3 bytes), the lease released and the session closed.
Refusals fail the job, never the node."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from sifoverlay.engine import lease, sessions
from sifoverlay.ocisif import open_image
from sifoverlay.slurm.config import load_config
from tests.slurm.conftest import DEV_CLUSTER, Cluster, User, sh

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

ROOT_FSTYPE = "awk '$2 == \"/\" { t = $3 } END { print t }' /proc/self/mounts"  # the task's / as it sees it
WRITER = 'i=0; while :; do echo "$i" >> /progress.log; dd if=/dev/urandom of=/blob bs=64k count=4 2>/dev/null; i=$((i+1)); done'


# -- helpers ------------------------------------------------------------------------------------
def ext3_sha256(image: Path) -> tuple[str, str]:
    """(recorded digest, sha256 of the overlay's bytes as they are in the file)."""
    with open_image(str(image)) as img:
        overlay = img.overlay
        assert overlay is not None
        offset, size, recorded = overlay.offset, overlay.size, overlay.recorded_digest
    digest = hashlib.sha256()
    with open(image, "rb") as fh:
        fh.seek(offset)
        left = size
        while left:
            chunk = fh.read(min(left, 4 << 20))
            assert chunk, "overlay runs past the end of the file"
            digest.update(chunk)
            left -= len(chunk)
    return recorded, "sha256:" + digest.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_reconciled(cluster: Cluster, image: Path, job: int) -> str:
    """The end of `job` was handled: consistent image, no lease, no session, no mounts."""
    recorded, actual = ext3_sha256(image)
    assert recorded == actual, f"image not reconciled: recorded {recorded}, ext3 bytes {actual}"
    from sifoverlay.ext3 import Superblock

    with open_image(str(image)) as img:
        assert img.overlay is not None
        sb = Superblock.read(img.sif.fd, img.overlay.offset, size=img.overlay.size)
        assert not sb.is_dirty, "ext3 left dirty"
    assert lease.inspect(str(image)) is None
    assert lease.readers(str(image)) == []
    assert not cluster.session_path(job).exists()
    assert not (cluster.runtime_dir / "mounts" / str(job)).exists()
    assert not (cluster.runtime_dir / "slurm" / str(job)).exists()
    return recorded


def rootfs_of(cluster: Cluster, job: int) -> Path:
    return cluster.runtime_dir / "mounts" / str(job) / "rootfs"


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def progress_lines(cluster: Cluster, job: int) -> int:
    try:
        return len((rootfs_of(cluster, job) / "progress.log").read_text().split())
    except OSError:
        return 0


@pytest.fixture
def outdir(image_dir: Path) -> Path:
    path = image_dir / "out"
    path.mkdir()
    path.chmod(0o1777)
    return path


def srun_in(cluster: Cluster, user: User, image: Path | str, *command: str, timeout: float = 120):  # type: ignore[no-untyped-def]
    """srun inside the image; returns once the job's Epilog is done too (srun itself
    returns before it)."""
    done = cluster.as_user(user, "srun", f"--oci-sif-overlay={image}", *command, cwd="/", timeout=timeout)
    cluster.settle(cancel=False)
    return done


# -- a job writes, the next job sees it ----------------------------------------------------------
def test_job_runs_inside_the_image(cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    assert Path("/etc/debian_version").exists()  # the host (which has busybox-static too: the test image's source)
    done = srun_in(cluster, alice, image, "sh", "-c",
                   "test -x /bin/busybox && test ! -e /etc/debian_version && id -u && pwd && " + ROOT_FSTYPE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(alice.uid), "/", "fuse.fuse-overlayfs"]  # mount=fuse: user FUSE


def test_write_then_next_job_sees_it_and_digest_matches(cluster: Cluster, slurm_users: tuple[User, User],
                                                        make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    before, _ = ext3_sha256(image)
    job = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                         "--wrap", "echo written-by-$SLURM_JOB_ID > /hello.txt; mkdir -p /data; "
                                   "seq 1 1000 > /data/numbers")
    assert cluster.wait_finished(job) == "COMPLETED"
    after = assert_reconciled(cluster, image, job)
    assert after != before
    done = srun_in(cluster, alice, image, "sh", "-c", "cat /hello.txt; wc -l < /data/numbers")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"written-by-{job}", "1000"]


def test_environment_twin_runs_the_job_in_the_image(cluster: Cluster, slurm_users: tuple[User, User],
                                                    make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    job = cluster.sbatch(alice, "-o", f"{outdir}/%j.out", "-D", "/", "--wrap", "echo twin > /twin.txt",
                         env={"OCI_SIF_OVERLAY": str(image)})
    assert cluster.wait_finished(job) == "COMPLETED"
    assert_reconciled(cluster, image, job)
    assert srun_in(cluster, alice, image, "cat", "/twin.txt").stdout == "twin\n"


# -- every kind of job end is reconciled by the Epilog --------------------------------------------
def _end_by_scancel(cluster: Cluster, job: int) -> None:
    sh("scancel", str(job))


def _end_by_scancel_kill(cluster: Cluster, job: int) -> None:
    sh("scancel", "-s", "KILL", str(job))


def _end_by_time_limit(cluster: Cluster, job: int) -> None:
    sh("scontrol", "update", f"JobId={job}", "TimeLimit=0")


@pytest.mark.parametrize("end,final", [
    (_end_by_scancel, "CANCELLED"),
    (_end_by_scancel_kill, "CANCELLED"),
    (_end_by_time_limit, "TIMEOUT"),
], ids=["scancel", "scancel-KILL", "TimeLimit=0"])
def test_killed_mid_write_is_reconciled_by_epilog(cluster: Cluster, slurm_users: tuple[User, User], make_image,
                                                  outdir: Path, end, final: str) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    job = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/", "--wrap", WRITER)
    cluster.wait_state(job, {"RUNNING"})
    wait_for(lambda: progress_lines(cluster, job) >= 5, what="the job to write")
    assert cluster.session_path(job).exists()
    assert lease.inspect(str(image)).job_id == str(job)  # type: ignore[union-attr]
    end(cluster, job)
    assert cluster.wait_finished(job, timeout=120) == final
    assert_reconciled(cluster, image, job)
    done = srun_in(cluster, alice, image, "sh", "-c", "wc -l < /progress.log")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 5


def test_slurmd_killed_mid_job_then_restarted(cluster: Cluster, slurm_users: tuple[User, User], make_image,
                                              outdir: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 slurmd while the job runs; the job ends while slurmd is down (COMPLETING);
    slurmd comes back, runs the Epilog, and the image is reconciled."""
    if cluster.foreign_jobs():
        pytest.skip("other users' jobs are running on the cluster: killing slurmd would disturb them")
    alice = slurm_users[0]
    image = make_image(alice)
    job = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/", "--wrap",
                         "echo started > /started.txt; sleep 5; echo after > /after.txt")
    cluster.wait_state(job, {"RUNNING"})
    wait_for(lambda: (rootfs_of(cluster, job) / "started.txt").exists(), what="the job to start")
    pid = int(Path("/run/sifoverlay-dev-cluster/slurmd.pid").read_text())
    os.kill(pid, 9)
    try:
        wait_for(lambda: (rootfs_of(cluster, job) / "after.txt").exists(), timeout=30, what="the job to finish")
        time.sleep(2)  # the job ends while slurmd is down
        assert cluster.session_path(job).exists()  # no Epilog yet
    finally:
        done = sh(str(DEV_CLUSTER), "up", check=False, timeout=300)
        assert done.returncode == 0, done.stderr
    assert cluster.wait_finished(job, timeout=120) == "COMPLETED"
    assert_reconciled(cluster, image, job)
    assert srun_in(cluster, alice, image, "cat", "/after.txt").stdout == "after\n"


# -- the sweeper: job ends that no Epilog handled --------------------------------------------------
def _recover_slurm() -> subprocess.CompletedProcess[str]:
    # the sweeper as the sifoverlay-slurm-sweeper unit runs it: the package's Python (plugstack sifoverlay=)
    python = load_config().sifoverlay or "/opt/sifoverlay/bin/python"
    return sh(python, "-m", "sifoverlay", "recover", "--slurm", "--json", check=False)


def _job_without_epilog(cluster: Cluster, user: User, image: Path, outdir: Path, command: str) -> int:
    """Run a job to completion while the Epilog is a no-op: its end is never handled."""
    epilog = Path("/usr/lib/sifoverlay/epilog")  # the package's (slurm.conf Epilog=)
    saved = epilog.read_bytes()
    noop = epilog.with_name("epilog.noop")
    noop.write_text("#!/bin/sh\nexit 0\n")
    noop.chmod(0o755)
    os.rename(noop, epilog)
    try:
        job = cluster.sbatch(user, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                             "--wrap", command)
        assert cluster.wait_finished(job) == "COMPLETED"
    finally:
        restore = epilog.with_name("epilog.restore")
        restore.write_bytes(saved)
        restore.chmod(0o755)
        os.rename(restore, epilog)
    return job


def test_sweeper_reconciles_job_whose_epilog_never_ran(cluster: Cluster, slurm_users: tuple[User, User],
                                                       make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    alice = slurm_users[0]
    image = make_image(alice)
    job = _job_without_epilog(cluster, alice, image, outdir, "echo swept > /swept.txt")
    # left behind: session, lease, mounts, an unreconciled image
    assert cluster.session_path(job).exists()
    assert lease.inspect(str(image)).job_id == str(job)  # type: ignore[union-attr]
    assert rootfs_of(cluster, job).is_dir()
    done = _recover_slurm()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)["slurm"]
    mine = [o for o in report["outcomes"] if o["job_id"] == str(job)]
    assert [(o["result"], o["image"]) for o in mine] == [("reconciled", str(image))]
    assert_reconciled(cluster, image, job)
    assert srun_in(cluster, alice, image, "cat", "/swept.txt").stdout == "swept\n"


def test_sweeper_finishes_journal_session_of_dead_job_and_spares_live_ones(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import socket

    alice = slurm_users[0]
    dead_image, live_image = make_image(alice, "dead.oci.sif"), make_image(alice, "live.oci.sif")
    dead_job = "999999001"  # never existed: slurmctld answers "invalid job id"
    sessions.start(cluster.journal_dir, dead_job, dead_image, mode="rw", host=socket.gethostname(),
                   uid=alice.uid, source="slurm")
    holder = lease.Holder(socket.gethostname(), os.getpid(), dead_job, "slurm", uid=alice.uid)
    held = lease.acquire(str(dead_image), holder, ttl=3600)
    os.close(held.lock_fd)  # as after the Prolog exited: only the lease file remains
    live = cluster.sbatch(alice, f"--oci-sif-overlay={live_image}", "-o", f"{outdir}/%j.out", "-D", "/",
                          "--wrap", "sleep 60")
    cluster.wait_state(live, {"RUNNING"})
    wait_for(lambda: cluster.session_path(live).exists(), what="the live session")
    done = _recover_slurm()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)["slurm"]
    assert report["backend"] == "cli"
    assert [(o["job_id"], o["result"]) for o in report["outcomes"]] == [(dead_job, "noop")]
    assert {"job_id": str(live), "why": "job still alive"} in report["skipped"]
    assert not cluster.session_path(int(dead_job)).exists()
    assert lease.inspect(str(dead_image)) is None
    assert cluster.session_path(live).exists()  # untouched
    assert lease.inspect(str(live_image)).job_id == str(live)  # type: ignore[union-attr]
    sh("scancel", str(live))
    cluster.wait_finished(live)
    assert_reconciled(cluster, live_image, live)


# -- refusals: the job fails with the reason, the node stays idle ----------------------------------
def test_second_rw_job_refused_naming_the_holder(cluster: Cluster, slurm_users: tuple[User, User], make_image,
                                                 outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    first = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                           "--wrap", "sleep 600")
    cluster.wait_state(first, {"RUNNING"})
    wait_for(lambda: rootfs_of(cluster, first).is_dir(), what="the first job's rootfs")
    for mode in ("", ":ro"):
        second = cluster.sbatch(alice, f"--oci-sif-overlay={image}{mode}", "-o", f"{outdir}/%j.out", "-D", "/",
                                "--wrap", "echo should-not-run")
        assert cluster.wait_finished(second) == "FAILED"
        assert cluster.job_state(first) == "RUNNING"
        out = (outdir / f"{second}.out").read_text()
        assert f"sifoverlay: job {second}: refused: {image}: held by job {first} (slurm) on host " \
               f"{os.uname().nodename}" in out
        assert "should-not-run" not in out
        assert cluster.job_fields(second)["RunTime"] in ("00:00:00", "00:00:01")  # refused at once, no waiting
    assert lease.inspect(str(image)).job_id == str(first)  # type: ignore[union-attr]
    sh("scancel", str(first))
    cluster.wait_finished(first)
    assert_reconciled(cluster, image, first)


def test_many_read_only_jobs_at_once(cluster: Cluster, slurm_users: tuple[User, User], make_image,
                                     outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice, bob = slurm_users
    image = make_image(alice)
    assert srun_in(cluster, alice, image, "sh", "-c", "echo shared > /shared.txt").returncode == 0
    recorded, _ = ext3_sha256(image)
    whole = file_sha256(image)
    jobs = [cluster.sbatch(user, f"--oci-sif-overlay={image}:ro", "-o", f"{outdir}/%j.out", "-D", "/", "--wrap",
                           "cat /shared.txt; if echo scratch > /scratch-$SLURM_JOB_ID 2>/dev/null; "
                           "then cat /scratch-$SLURM_JOB_ID; fi; sleep 20")
            for user in (alice, bob, alice, bob)]
    wait_for(lambda: all(cluster.job_state(j) == "RUNNING" for j in jobs) and len(lease.readers(str(image))) == 4,
             timeout=120, what="the four :ro jobs to run at the same time")
    assert sorted(r.job_id for r in lease.readers(str(image))) == sorted(str(j) for j in jobs)
    assert lease.inspect(str(image)) is None  # readers only, no writer
    writer = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", "true", cwd="/")
    assert writer.returncode != 0
    assert f"refused: {image}: held read-only by job " in writer.stderr
    for job, user in zip(jobs, (alice, bob, alice, bob)):
        assert cluster.wait_finished(job) == "COMPLETED", (outdir / f"{job}.out").read_text()
        out = (outdir / f"{job}.out").read_text()
        if user is alice:  # the image's owner may write into its ro view (a tmpfs upper)
            assert out == "shared\nscratch\n"
        else:
            assert out.startswith("shared\n")
    assert file_sha256(image) == whole  # read-only jobs never write the image
    assert ext3_sha256(image) == (recorded, recorded)
    assert lease.readers(str(image)) == []
    done = srun_in(cluster, alice, image, "sh", "-c", "ls / | grep -c scratch- || true")
    assert done.stdout.strip() == "0"  # their writes were discarded


def test_user_who_cannot_write_is_refused_before_anything_is_mounted(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice, bob = slurm_users
    image = make_image(alice, mode=0o644)  # bob may read, not write
    whole, mtime = file_sha256(image), image.stat().st_mtime_ns
    job = cluster.sbatch(bob, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                         "--wrap", "echo should-not-run")
    assert cluster.wait_finished(job) == "FAILED"
    out = (outdir / f"{job}.out").read_text()
    assert f"sifoverlay: job {job}: refused: {image}: user {bob.name} (uid {bob.uid}) may not write this image" in out
    assert "should-not-run" not in out
    assert (file_sha256(image), image.stat().st_mtime_ns) == (whole, mtime)
    assert lease.inspect(str(image)) is None
    assert not (cluster.runtime_dir / "mounts" / str(job)).exists()
    assert not cluster.session_path(job).exists()
    log = Path("/var/log/sifoverlay/slurm.log").read_text()
    assert f"job {job} refused: {image}: user {bob.name}" in log
    assert f"assembled {image} for job {job}" not in log
    # ... and the same user may still run it read-only
    assert srun_in(cluster, bob, f"{image}:ro", "true").returncode == 0


def test_image_outside_roots_is_refused(cluster: Cluster, slurm_users: tuple[User, User], make_image,
                                        outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    outside = Path("/var/tmp") / f"sifo-outside-{os.getpid()}"
    outside.mkdir(mode=0o755, exist_ok=True)
    try:
        image = make_image(alice, where=outside)
        done = srun_in(cluster, alice, image, "true")
        assert done.returncode != 0
        assert f"refused: {image}: outside the allowed image roots ({cluster.image_root})" in done.stderr
    finally:
        for p in outside.iterdir():
            p.unlink()
        outside.rmdir()


def test_salloc_steps_run_in_the_image(cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    """salloc's shell stays on the host; its srun steps inherit the option and run inside."""
    alice = slurm_users[0]
    image = make_image(alice)
    done = cluster.as_user(alice, "salloc", f"--oci-sif-overlay={image}", "sh", "-c",
                           "test -e /etc/debian_version && echo host-shell; "
                           "srun sh -c 'echo step1 > /steps.txt'; srun cat /steps.txt", cwd="/")
    cluster.settle(cancel=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["host-shell", "step1"]
    job = int(done.stderr.split("Granted job allocation ")[1].split()[0])
    assert_reconciled(cluster, image, job)


def test_crafted_image_is_refused_without_harming_the_node(cluster: Cluster, slurm_users: tuple[User, User],
                                                           make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    """A user-made image whose ext3 superblock is garbage: refused before any mount, the
    image bytes untouched, no lease or session left, the node idle (checked by the fixture)."""
    alice = slurm_users[0]
    image = make_image(alice)
    with open_image(str(image)) as img:
        assert img.overlay is not None
        magic_at = img.overlay.offset + 1024 + 56  # s_magic (0xEF53)
    with open(image, "r+b") as fh:
        fh.seek(magic_at)
        fh.write(b"\x00\x00")
    whole = file_sha256(image)
    job = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                         "--wrap", "echo should-not-run")
    assert cluster.wait_finished(job) == "FAILED"
    out = (outdir / f"{job}.out").read_text()
    assert (f"sifoverlay: job {job}: refused: {image}: ext3 overlay at offset {magic_at - 1080}: "
            "no ext2/3/4 superblock: magic is 0x0000, expected 0xef53") in out
    assert "should-not-run" not in out
    assert file_sha256(image) == whole
    assert lease.inspect(str(image)) is None
    assert not cluster.session_path(job).exists()
    assert not (cluster.runtime_dir / "mounts" / str(job)).exists()


def test_kernel_mount_mode_opt_in(cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    """plugstack mount=kernel (trusted images): the same job runs on kernel overlayfs and is
    reconciled the same way. The cluster is switched back to fuse afterwards."""
    if cluster.foreign_jobs():
        pytest.skip("other users' jobs are running on the cluster: switching its mount mode would change theirs")
    alice = slurm_users[0]
    image = make_image(alice)
    env = {**os.environ, "SIFOVERLAY_MOUNT": "kernel"}
    done = subprocess.run([str(DEV_CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert done.returncode == 0, done.stderr
        job_out = srun_in(cluster, alice, image, "sh", "-c", "echo kernel > /mode.txt && " + ROOT_FSTYPE)
        assert job_out.returncode == 0, job_out.stderr
        assert job_out.stdout.split() == ["overlay"]
        assert srun_in(cluster, alice, image, "cat", "/mode.txt").stdout == "kernel\n"
    finally:
        back = subprocess.run([str(DEV_CLUSTER), "up"], capture_output=True, text=True, timeout=300)
        assert back.returncode == 0, back.stderr
    recorded, actual = ext3_sha256(image)
    assert recorded == actual
    assert lease.inspect(str(image)) is None


def test_step_cannot_switch_or_add_an_image(cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    """The image belongs to the job (the Prolog prepares it): a step may not ask for
    another one, nor for one when the job was submitted without."""
    alice = slurm_users[0]
    first, second = make_image(alice, "a.oci.sif"), make_image(alice, "b.oci.sif")
    done = cluster.as_user(alice, "salloc", f"--oci-sif-overlay={first}", "srun",
                           f"--oci-sif-overlay={second}", "true", cwd="/")
    cluster.settle(cancel=False)
    assert done.returncode != 0
    assert f"this step asks for {second} but the job runs {first}: one image per job" in done.stderr
    done = cluster.as_user(alice, "salloc", "srun", f"--oci-sif-overlay={second}", "true", cwd="/")
    cluster.settle(cancel=False)
    assert done.returncode != 0
    assert (f"{second}: no rootfs was prepared for this job: give --oci-sif-overlay when the job is "
            "submitted (sbatch/salloc/srun), not only to a step") in done.stderr
    assert lease.inspect(str(first)) is None and lease.inspect(str(second)) is None


def test_next_job_finishes_a_dead_holder_before_the_sweeper(cluster: Cluster, slurm_users: tuple[User, User],
                                                            make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    """The Epilog of job A never ran and no sweep happened yet: job B on the same image and
    node is not refused because of A; its Prolog asks slurmctld, finds A over, does A's job
    end first (reconcile + release), then runs B."""
    alice = slurm_users[0]
    image = make_image(alice)
    dead = _job_without_epilog(cluster, alice, image, outdir, "echo from-dead > /dead.txt")
    assert lease.inspect(str(image)).job_id == str(dead)  # type: ignore[union-attr]
    done = srun_in(cluster, alice, image, "cat", "/dead.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from-dead\n"
    assert not cluster.session_path(dead).exists()
    assert not rootfs_of(cluster, dead).exists()
    recorded, actual = ext3_sha256(image)
    assert recorded == actual and lease.inspect(str(image)) is None
    log = Path("/var/log/sifoverlay/slurm.log").read_text()
    assert f"held by job {dead}, which is over but was never cleaned up: finishing it first" in log


def test_image_through_a_symlinked_directory(cluster: Cluster, slurm_users: tuple[User, User], make_image,
                                             image_dir: Path, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    """Directories may be symlinks (sites link /shared to a mount): the job runs, the lease
    and session use the resolved path, so two spellings of one image share one lease."""
    alice = slurm_users[0]
    real = image_dir / "real"
    real.mkdir(mode=0o755)
    image = make_image(alice, where=real)
    (image_dir / "link").symlink_to(real)
    spelled = image_dir / "link" / image.name
    job = cluster.sbatch(alice, f"--oci-sif-overlay={spelled}", "-o", f"{outdir}/%j.out", "-D", "/",
                         "--wrap", "echo via-link > /link.txt; sleep 30")
    cluster.wait_state(job, {"RUNNING"})
    wait_for(lambda: cluster.session_path(job).exists(), what="the session")
    assert sessions.load(cluster.journal_dir, str(job)).image == str(image)  # type: ignore[union-attr]
    other = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/", "--wrap", "true")
    assert cluster.wait_finished(other) == "FAILED"
    assert f"held by job {job} (slurm)" in (outdir / f"{other}.out").read_text()
    sh("scancel", str(job))
    cluster.wait_finished(job)
    assert_reconciled(cluster, image, job)
    assert srun_in(cluster, alice, spelled, "cat", "/link.txt").stdout == "via-link\n"
