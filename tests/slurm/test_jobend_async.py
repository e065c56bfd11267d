"""The async job end on the live cluster (epilog_reconcile=async, the default; issue 17
item 2): a rw job's Epilog hands the hash to the reconcile worker and the node goes idle;
a rw job started right behind it waits for the worker's commit and sees the writes; the
timing records show the hand-over."""

from __future__ import annotations

import pytest

from sifoverlay.slurm.config import load_config
from sifoverlay.slurm.phases import records_of_job, timing_path
from tests.slurm.conftest import Cluster, User
from tests.slurm.test_jobs import assert_reconciled

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

ROUNDS = 4


def test_back_to_back_rw_jobs_see_each_others_writes(cluster: Cluster, slurm_users: tuple[User, User],
                                                     make_image) -> None:  # type: ignore[no-untyped-def]
    assert load_config().epilog_reconcile == "async"
    alice = slurm_users[0]
    image = make_image(alice)
    jobs = []
    for i in range(ROUNDS):
        # no settle between the jobs: each srun is submitted the moment the previous returns,
        # while that job's Epilog or reconcile worker may still be ending it
        done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", "sh", "-c",
                               f"echo $SLURM_JOB_ID; cat /round.txt 2>/dev/null || echo none; echo {i} > /round.txt",
                               cwd="/", timeout=180)
        assert done.returncode == 0, done.stderr
        job, seen = done.stdout.split()
        assert seen == (str(i - 1) if i else "none"), (i, done.stdout, done.stderr)
        jobs.append(job)
    cluster.settle(cancel=False)
    assert_reconciled(cluster, image, int(jobs[-1]))
    for job in jobs:
        records = records_of_job(timing_path() or "", job)
        assert records["prolog"]["result"] == "ready", records
        assert records["epilog"]["result"] == "pending", records
        assert set(records["epilog"]["phases"]) == {"unmount", "verify", "handoff"}, records  # type: ignore[arg-type]
        assert records["worker"]["result"] == "reconciled", records
        assert "hash" in records["worker"]["phases"], records  # type: ignore[operator]


def test_a_ro_job_starts_while_the_writers_job_end_still_hashes(cluster: Cluster, slurm_users: tuple[User, User],
                                                                imported_image, image_dir) -> None:  # type: ignore[no-untyped-def]
    """Issue 17 item 2: "a next :ro job on that image may start at once (the bytes do not
    change while hashing)". An 8 GiB overlay takes seconds to hash; the ro job submitted the
    moment the rw job returns is ready (its Prolog's record) before the worker's commit, and
    reads the rw job's write."""
    import os
    import subprocess

    from sifoverlay.engine import create_overlay

    alice = slurm_users[0]
    image = image_dir / "big.oci.sif"
    subprocess.run(["cp", "--sparse=always", str(imported_image), str(image)], check=True)
    create_overlay(image, size_mib=8192, sparse=True, uid=alice.uid, gid=alice.gid,
                   journal_dir=str(image_dir / "journal-setup"))
    os.chown(image, alice.uid, alice.gid)
    os.chmod(image, 0o644)
    wrote = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", "sh", "-c",
                            "echo $SLURM_JOB_ID; echo written-by-$SLURM_JOB_ID > /ro-check.txt", cwd="/", timeout=180)
    assert wrote.returncode == 0, wrote.stderr
    writer = wrote.stdout.strip()
    read = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}:ro", "sh", "-c",
                           "echo $SLURM_JOB_ID; cat /ro-check.txt", cwd="/", timeout=180)
    assert read.returncode == 0, read.stderr
    reader, seen = read.stdout.split()
    assert seen == f"written-by-{writer}", read.stdout
    cluster.settle(cancel=False)
    assert_reconciled(cluster, image, int(writer))
    writer_records, reader_records = (records_of_job(timing_path() or "", job) for job in (writer, reader))
    worker, ready = writer_records["worker"], reader_records["prolog"]
    assert writer_records["epilog"]["result"] == "pending" and worker["result"] == "reconciled", writer_records
    assert worker["phases"]["hash"] > 1.0, worker  # type: ignore[index,operator]  # 8 GiB: seconds, not ms
    assert ready["result"] == "ready", reader_records
    # the reader's Prolog finished (records are written at the end of each) before the
    # worker did: the ro job did not wait for the hash
    assert float(ready["time"]) < float(worker["time"]), (ready, worker)  # type: ignore[arg-type]
