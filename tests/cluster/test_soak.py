"""The short multi-node soak CI runs (issue 13; the full 200-job soak is the bench
`bench/soak.py --nodes 3`): 30 jobs of every kind (rw, disturbed rw, :ro on one and on all
nodes, rw arrays) over 3 images on the 3-node bed, with one node kill, one cut, one short
and one long freeze, scancel, scancel -s KILL and time limits. It must end with every image
consistent (checked without our library) and clean, every COMPLETED rw job's file read
back, no double rw mount in any sample of any node, and no job failed except by the rules
(a writer refused by a held image, a task that died with its node)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.slow]

JOBS, IMAGES, SEED = 30, 3, 7013


def test_short_soak(bed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--nodes", "3", "--n", str(JOBS),
                           "--k", str(IMAGES), "--seed", str(SEED), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    print(f"\nshort soak: {json.dumps(summary)}\nevents: {result['events']}\nfailures: "
          + "\n  ".join(f"{f['job']} {f['kind']} {f['state']} [{f['class']}] {f['why']}" for f in result["failures"]))
    assert result["problems"] == [] and done.returncode == 0, (result["problems"], done.stderr[-3000:])
    assert result["jobs_submitted"] == JOBS
    assert result["images_checked"] == result["images_consistent"] == IMAGES
    assert result["drift_states"] == {"clean": IMAGES}
    assert result["files_verified"] == result["files_expected"] > 0
    assert result["double_rw_mounts"] == 0 and result["mount_samples"] > 100
    assert result["failed_unexpected"] == 0
    assert result["nodes_drained"] == []  # no Prolog or Epilog failed a node
    for event in ("node_kill", "node_cut", "node_freeze_short", "node_freeze_long"):
        assert result["events"][event] >= 1, result["events"]  # the disturbances did happen
    assert result["tasks_by_state"].get("COMPLETED", 0) >= JOBS // 2, result["tasks_by_state"]
