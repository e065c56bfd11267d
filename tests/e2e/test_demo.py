"""`./scripts/demo.sh` end to end: the README's first command, asserted on its summary."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.root]


def test_demo_runs_and_reports_a_clean_reconciled_image(tmp_path: Path, e2e_ready: None) -> None:
    out = tmp_path / "demo-out"
    env = dict(os.environ, DEMO_OUT=str(out), SIFOVERLAY_JOURNAL_DIR="/var/lib/sifoverlay/journal")
    script = str(REPO / "scripts" / "demo.sh")
    try:
        proc = subprocess.run([script], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        image = Path(summary["image"])
        final_status = json.loads((out / "status-final.json").read_text())
        # Our own hash of the ext3 bytes, not the demo's and not the library's.
        h = hashlib.sha256()
        with open(image, "rb") as f:
            f.seek(final_status["overlay_offset"])
            left = final_status["overlay_size"]
            while left:
                chunk = f.read(min(left, 4 << 20))
                assert chunk
                h.update(chunk)
                left -= len(chunk)
        bytes_digest = "sha256:" + h.hexdigest()
    finally:
        subprocess.run([script, "clean"], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)

    assert summary["local"] == {"state_after_write": "modified", "sync": "reconciled",
                                "state_after_sync": "clean", "read_back": "prepared by root"}
    slurm = summary["slurm"]
    assert slurm["ran"] is True, slurm
    jobs = slurm["jobs"]
    assert jobs["write"]["state"] == "COMPLETED"
    assert jobs["killed"]["state"] == "CANCELLED"
    assert jobs["read"]["state"] == "COMPLETED"
    assert jobs["read"]["output"] == f"answer=42 from job {jobs['write']['id']}"
    assert slurm["killed_job_lines_kept"] >= 1  # the killed job's writes so far survive
    assert summary["metrics"] == {"after_create": "clean", "after_local_write": "modified", "after_sync": "clean",
                                  "during_job": "in-use", "final": "clean"}
    final = summary["final"]
    assert final["state"] == "clean"
    assert final["recorded_digest"] == bytes_digest == final["sha256_of_ext3_bytes"] == final["actual_digest"]
    assert final["digest_matches_bytes"] is True
    assert final["journal_pending"] == 0
    assert summary["seconds"] < 300
    assert re.search(r"image:\s+clean, digest == sha256\(ext3 bytes\): true", proc.stdout)
    # clean removed what the demo created
    assert not image.parent.exists()
    assert not out.exists()
