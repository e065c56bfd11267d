"""Writers queue instead of failing (docs/slurm.md "Writers queue"): each image is a Slurm
license (job_submit.lua); a rw job takes all of it, so while the image is held the next
writer stays PENDING with Reason=Licenses and starts when the holder ends."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import Bed, User, overlay_status

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.slow]


def pending_reasons(bed: Bed, job: int) -> set[str]:
    out = bed.run("squeue", "-h", "-r", "-j", str(job), "-t", "PENDING", "-o", "%r").stdout
    return set(out.split())


def read_in_image(bed: Bed, user: User, image: Path, path: str, cwd: Path) -> str:
    done = bed.as_user(user, "srun", "-N1", f"--oci-sif-overlay={image}:ro", "cat", path, cwd=str(cwd))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_array_of_twenty_writers_all_complete(bed: Bed, bed_users: tuple[User, User], bed_image,
                                              bed_out: Path) -> None:
    alice = bed_users[0]
    image = bed_image(alice)
    started = time.monotonic()
    job = bed.sbatch(alice, "--array=1-20", f"--oci-sif-overlay={image}:rw", "-o", str(bed_out / "%A_%a.out"),
                     "--wrap", "echo $SLURM_ARRAY_TASK_ID >> /tasks.txt", cwd=str(bed_out))
    seen: set[str] = set()
    while "Licenses" not in seen and time.monotonic() - started < 30:  # 'None' until the first pass
        seen |= pending_reasons(bed, job)
        time.sleep(0.2)
    assert "Licenses" in seen  # the others wait for the image, visibly
    bed.wait_finished(job, timeout=300)
    elapsed = time.monotonic() - started
    tasks = bed.accounting(job)
    states = sorted(t["JobState"] for t in tasks)
    assert states == ["COMPLETED"] * 20, [(t["ArrayTaskId"], t["JobState"], t.get("Reason")) for t in tasks]
    lines = read_in_image(bed, alice, image, "/tasks.txt", bed_out).split()
    assert sorted(lines, key=int) == [str(i) for i in range(1, 21)]
    assert overlay_status(image) == f"{image}: clean"
    print(f"20 rw array tasks on one image: {elapsed:.1f}s, 20 COMPLETED, 0 FAILED")


def test_two_writers_on_two_nodes_take_turns(bed: Bed, bed_users: tuple[User, User], bed_image,
                                             bed_out: Path) -> None:
    alice = bed_users[0]
    image = bed_image(alice)
    first = bed.sbatch(alice, "-w", "n1", f"--oci-sif-overlay={image}:rw", "-o", str(bed_out / "%j.out"),
                       "--wrap", "echo first $(hostname) >> /log.txt; sleep 8", cwd=str(bed_out))
    bed.wait_state(first, {"RUNNING"})
    second = bed.sbatch(alice, "-w", "n2", f"--oci-sif-overlay={image}:rw", "-o", str(bed_out / "%j.out"),
                        "--wrap", "echo second $(hostname) >> /log.txt", cwd=str(bed_out))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # n2 is idle: only the image keeps it waiting
        fields = bed.job_fields(second)
        assert fields["JobState"] == "PENDING", fields
        time.sleep(0.5)
    assert fields["Reason"] == "Licenses"
    assert bed.job_state(first) == "RUNNING"
    assert bed.wait_finished(first) == "COMPLETED"
    assert bed.wait_finished(second) == "COMPLETED"
    assert read_in_image(bed, alice, image, "/log.txt", bed_out) == "first n1\nsecond n2\n"
    assert overlay_status(image) == f"{image}: clean"


def test_next_writer_waits_for_the_epilog_of_an_ended_holder(bed: Bed, bed_users: tuple[User, User], bed_image,
                                                             bed_out: Path) -> None:
    """Slurm gives the license back when a job ends, before its Epilog (or the reconcile
    worker it started) has released the lease. The next writer's Prolog then finds the lease
    held by a job slurmctld reports as over whose job-end lock is held: it waits for the
    release (instead of refusing the job) and goes on."""
    from sifoverlay.engine import lease
    from sifoverlay.slurm import endlock

    alice = bed_users[0]
    image = bed_image(alice)
    ended = bed.sbatch(alice, "-N1", "--wrap", "true", cwd=str(bed_out))  # a job that is over
    assert bed.wait_finished(ended) == "COMPLETED"
    # its "job end still running": the lease, held on another host in ended's name, and the
    # job-end lock its Epilog or reconcile worker holds meanwhile (slurm/endlock.py)
    ending = endlock.take(str(bed.state_dir / "journal"), str(ended), "elsewhere")
    assert ending is not None
    held = lease.acquire(str(image), lease.Holder("elsewhere", os.getpid(), str(ended), "slurm", uid=0),
                         ttl=120, state_dir=str(bed.state_dir))

    def job_end_done() -> None:
        held.release()
        ending.release()

    releaser = threading.Timer(6, job_end_done)
    releaser.start()
    try:
        job = bed.sbatch(alice, "-N1", f"--oci-sif-overlay={image}:rw", "-o", str(bed_out / "%j.out"),
                         "--wrap", "echo after >> /after.txt", cwd=str(bed_out))
        assert bed.wait_finished(job) == "COMPLETED", (bed_out / f"{job}.out").read_text()
    finally:
        releaser.join()
    assert read_in_image(bed, alice, image, "/after.txt", bed_out) == "after\n"
    assert overlay_status(image) == f"{image}: clean"


def test_writer_held_by_a_live_job_outside_the_queue_is_refused(bed: Bed, bed_users: tuple[User, User],
                                                                bed_image, bed_out: Path) -> None:
    """A holder that is no ended Slurm job (here: a CLI user's lease) is never waited for:
    the job fails at once, naming the holder."""
    from sifoverlay.engine import lease

    alice = bed_users[0]
    image = bed_image(alice)
    held = lease.acquire(str(image), lease.Holder("elsewhere", os.getpid(), "cli-1", "cli", uid=0), ttl=120,
                         state_dir=str(bed.state_dir))
    try:
        started = time.monotonic()
        job = bed.sbatch(alice, "-N1", f"--oci-sif-overlay={image}:rw", "-o", str(bed_out / "%j.out"),
                         "--wrap", "true", cwd=str(bed_out))
        assert bed.wait_finished(job) == "FAILED"
        assert time.monotonic() - started < 30
        assert "held by job cli-1" in (bed_out / f"{job}.out").read_text()
    finally:
        held.release()
