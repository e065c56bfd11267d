"""bench/soak.py with a small N through the real Slurm: every kind of kill happens at
least once, and afterwards every image is consistent (checked without our library),
every completed job's file is there, and every image is clean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.root]


def test_soak_small(tmp_path, e2e_ready: None) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--n", "10", "--k", "2", "--seed", "7",
                           "--json-out", str(out)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0, result["problems"]
    assert result["ok"] is True and result["problems"] == []
    assert result["jobs_submitted"] == 10
    assert sum(result["jobs_by_state"].values()) == 10
    # FAILED: refused by the lease in a burst; NODE_FAIL: slurmctld's verdict on a job whose
    # slurmd was killed (the job may also survive the restart and complete)
    assert set(result["jobs_by_state"]) <= {"COMPLETED", "CANCELLED", "TIMEOUT", "FAILED", "NODE_FAIL"}
    # each disturbance kind was applied to a running job
    assert all(result["kills"][kind] >= 1 for kind in ("scancel", "scancel_kill", "time_limit", "slurmd_kill9")), result
    assert result["bursts"] >= 2
    assert result["images_checked"] == result["images_consistent"] == 2
    assert result["drift_states"] == {"clean": 2}
    completed = result["jobs_by_state"].get("COMPLETED", 0)
    assert completed >= 1
    assert result["files_expected"] == completed == result["files_verified"]
    assert result["sweeper_exit"] == 0
