"""`./scripts/demo.sh` end to end: the README's first command, asserted on its summary; and
`./scripts/demo.sh clean` from the states a failed run leaves, without a slurmctld."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = str(REPO / "scripts" / "demo.sh")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.root
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

    # the image was built here, from Debian's busybox-static: nothing outside the repository
    assert summary["source"]["busybox"].startswith("/bin/busybox (busybox-static 1:"), summary["source"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", summary["source"]["layout_manifest"])
    # no path into the conformance set (the checkout's own path may contain any word)
    stdout = proc.stdout.replace(str(REPO), "<repo>")
    assert "../shared" not in stdout and "/vectors" not in stdout and "shared/vectors" not in stdout
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
    # after the write: `modified` (superblock changed), or `drift` once the exporter's verify pass hashed it
    assert summary["metrics"]["after_local_write"] in ("modified", "drift"), summary["metrics"]
    assert summary["metrics"] == {"after_create": "clean", "after_local_write": summary["metrics"]["after_local_write"],
                                  "after_sync": "clean", "during_job": "in-use", "final": "clean"}
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


def _no_slurmctld_path(tmp_path: Path) -> str:
    """PATH whose squeue/scancel fail like Slurm's client does when no slurmctld answers."""
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    for name in ("squeue", "scancel"):
        (fake / name).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    return f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def _clean(out: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEMO_OUT=str(out), PATH=path)
    return subprocess.run([SCRIPT, "clean"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


def test_clean_after_a_failed_run_without_slurm_then_again(tmp_path: Path) -> None:
    """What a run that died after starting the exporter leaves: state, a live exporter, an
    image dir, a mount-free run dir. `clean` (twice) succeeds with squeue failing."""
    out, images = tmp_path / "demo-out", tmp_path / "images" / "demo-1-2"
    (out / "run").mkdir(parents=True)
    images.mkdir(parents=True)
    (images / "busybox.oci.sif").write_bytes(b"half-written")
    exporter = subprocess.Popen(["sleep", "300"])
    try:
        (out / "state").write_text(f"run=1-2\nimage_dir={images}\nexporter_pid={exporter.pid}\n")
        path = _no_slurmctld_path(tmp_path)
        first = _clean(out, path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stdout.splitlines() == [f"demo: stopped the exporter (pid {exporter.pid})",
                                             f"demo: removed {images}", "demo: clean"]
        assert exporter.wait(timeout=10) == -15
        assert not out.exists() and not images.exists()
        second = _clean(out, path)
        assert (second.returncode, second.stdout) == (0, f"demo: nothing to clean ({out} not found)\n")
    finally:
        exporter.kill()
        exporter.wait()


def test_clean_of_a_run_that_died_before_writing_its_state(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "setup.log").write_text("interrupted\n")
    done = _clean(out, _no_slurmctld_path(tmp_path))
    assert (done.returncode, done.stdout, done.stderr) == (0, "demo: clean\n", "")
    assert not out.exists()
