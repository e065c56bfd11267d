"""The short CI variant of the multi-node soak (`bench/soak.py --nodes 3`; the full soak,
200 jobs, is a bench): a dozen jobs of every kind with one node kill, cut, short freeze and
long freeze, on the 3-node test bed. Every image consistent and clean, every COMPLETED
writer's file present, no double rw mount seen by the monitor, no job failed except by
the rules (busy image, node event), no job session left open."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import Bed
from tests.conftest import REPO


def test_short_multinode_soak(bed: Bed, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--nodes", "3", "--n", "12", "--k", "2",
                           "--seed", "4242", "--json-out", str(out)], capture_output=True, text=True, timeout=1800,
                          stdin=subprocess.DEVNULL)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    print(f"\nshort soak: {json.dumps(result, sort_keys=True)}")
    assert result["problems"] == [] and result["ok"] is True, result
    assert done.returncode == 0
    assert result["jobs_submitted"] == 12
    assert all(result["events"][e] >= 1 for e in ("node_kill", "node_cut", "node_freeze_short", "node_freeze_long"))
    assert result["double_rw_mounts"] == 0 and result["mount_samples"] > 0
    assert result["failed_unexpected"] == 0
    assert result["images_consistent"] == result["images_checked"] == 2
    assert result["files_verified"] == result["files_expected"]
