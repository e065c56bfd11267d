"""The sweeper ends this host's over jobs on a bounded pool (issue 17 item 4): several
images at once, the job ends of one image never at once, outcomes in session order.
Real images and leases, no cluster (slurmctld's answer is a fixed table)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from sifoverlay.slurm import sweeper
from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.jobend import JobEndOutcome

from tests.slurm.test_epilog_metrics import (  # noqa: F401 - fixtures
    FixedJobState, _lease_by_exited_process, _start_session, _write_with_debugfs, config, overlay_image, textdir,
)

pytest.importorskip("prometheus_client")


def test_pool_reconciles_every_changed_image(overlay_image: Path, config: SlurmConfig, textdir: Path,
                                             tmp_path: Path) -> None:
    from sifoverlay.engine import sessions, status

    images = []
    for n in range(4):
        image = overlay_image.parent / f"img{n}.oci.sif"
        subprocess.run(["cp", "--sparse=always", str(overlay_image), str(image)], check=True)
        job = str(60 + n)
        _lease_by_exited_process(image, job, ttl=365 * 24 * 3600.0)
        _start_session(config, job, image)
        _write_with_debugfs(image, tmp_path, name=f"upper/file{n}")
        images.append(image)
    report = sweeper.sweep(config, FixedJobState(frozenset({"60", "61", "62", "63"})), textfile_dir=str(textdir),
                           cluster=False, workers=4)
    assert sorted((o.job_id, o.result) for o in report.outcomes) == [(str(60 + n), "reconciled") for n in range(4)]
    assert sessions.open_sessions(config.journal_dir) == []
    assert [status(image).state for image in images] == ["clean"] * 4


def test_one_image_one_job_end_at_a_time_and_outcomes_in_order(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    active: dict[str, int] = {}
    most: dict[str, int] = {}
    overall = [0, 0]
    lock = threading.Lock()
    due = [("1", "/a"), ("2", "/b"), ("3", "/a"), ("4", "/c"), ("5", None), ("6", "/a")]
    image_of = dict(due)

    def finish_job(job_id: str, config: SlurmConfig, **_: object) -> JobEndOutcome:
        image = image_of[job_id] or f"none-{job_id}"
        with lock:
            active[image] = active.get(image, 0) + 1
            most[image] = max(most.get(image, 0), active[image])
            overall[0] += 1
            overall[1] = max(overall[1], overall[0])
        time.sleep(0.05)
        with lock:
            active[image] -= 1
            overall[0] -= 1
        return JobEndOutcome(job_id, image_of[job_id], "reconciled", "record")

    monkeypatch.setattr(sweeper, "finish_job", finish_job)
    outcomes = sweeper._finish_all(due, SlurmConfig(journal_dir=str(tmp_path)), None, None, workers=3)
    assert [o.job_id for o in outcomes] == ["1", "2", "3", "4", "5", "6"]
    assert most["/a"] == 1 and all(n == 1 for n in most.values())
    assert overall[1] in (2, 3)  # the images ran side by side, never more than the pool
    serial = sweeper._finish_all(due, SlurmConfig(journal_dir=str(tmp_path)), None, None, workers=1)
    assert [o.job_id for o in serial] == ["1", "2", "3", "4", "5", "6"]
    assert sweeper.sweep_workers() == max(1, min(4, __import__("os").cpu_count() or 1))
