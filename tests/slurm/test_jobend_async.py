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
