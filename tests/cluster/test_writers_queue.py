"""Writers queue instead of failing (docs/slurm.md "Writers queue"): each image is a Slurm
license (job_submit.lua); a rw job takes all of it, so while the image is held the next
writer stays PENDING with Reason=Licenses and starts when the holder ends."""

from __future__ import annotations

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
