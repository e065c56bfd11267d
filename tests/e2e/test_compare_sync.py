"""bench/compare_sync.py (cut points only): our sync + recover is old-or-new at every
write point, the re-enacted SingularityCE order is not. Guards the claims of
docs/comparison.md against regressions in the engine or the SIF verbs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.crash]


def test_compare_sync_cut_points(tmp_path: Path) -> None:
    require_tool("debugfs", "mkfs.ext3", "e2fsck")
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compare_sync.py"), "--no-speed", "--json-out", str(out)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours, go, go_fsync = result["ours"], result["go"], result["go+fsync"]
    for name, run in (("ours", ours), ("go", go), ("go+fsync", go_fsync)):
        assert run["uninterrupted"] == "new", name  # every sequence does the job when not cut
        points = sum(v for k, v in run["total"].items() if k != "recover_failed")
        lost = sum(run["lost_one"].values())
        assert points == run["write_ops"] + 2 * (run["write_ops"] + 1) + lost, name
    assert ours["bad"] == 0 and set(ours["total"]) == {"old", "new"}
    assert "recover_failed" not in ours["total"]
    assert ours["fsyncs"] > 0 and go["fsyncs"] == 0
    # Go's order: a crash between its first and last write leaves an image that will not load
    assert go["crash"].get("refused", 0) == go["write_ops"] - 2
    assert go["bad"] > 0 and go_fsync["bad"] > 0
    assert go["bad_then_rerun_sync"].get("refused", 0) == go["bad"]
