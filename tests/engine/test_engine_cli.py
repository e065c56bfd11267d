"""`sifoverlay overlay ...` and `sifoverlay recover` through the real CLI process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sifoverlay.engine import lease
from tests.conftest import require_tool
from tests.engine.conftest import assert_consistent, modify_overlay


def cli(repo: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sifoverlay", *argv], cwd=repo, capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=300)


def test_overlay_verbs_end_to_end(base_image: Path, tmp_path: Path, repo_root: Path) -> None:
    require_tool("mkfs.ext3", "debugfs")
    journal = tmp_path / "cli-journal"
    jd = ["--journal-dir", str(journal)]
    created = cli(repo_root, "overlay", "create", "--size", "64", "--sparse", "--json", *jd, str(base_image))
    assert created.returncode == 0, created.stderr
    op = json.loads(created.stdout)
    assert (op["action"], op["layer_size"]) == ("created", 64 << 20)
    status = json.loads(cli(repo_root, "overlay", "status", "--json", *jd, str(base_image)).stdout)
    assert (status["state"], status["recorded_digest"], status["journal_pending"]) == ("clean", op["layer_digest"], 0)
    noop = cli(repo_root, "overlay", "sync", "--json", *jd, str(base_image))
    assert json.loads(noop.stdout)["action"] == "noop" and noop.stderr == ""
    modify_overlay(base_image, tmp_path)
    assert json.loads(cli(repo_root, "overlay", "status", "--json", *jd, str(base_image)).stdout)["state"] == "modified"
    synced = cli(repo_root, "overlay", "sync", *jd, str(base_image))
    assert synced.returncode == 0 and ": reconciled (sha256:" in synced.stdout
    assert_consistent(base_image)
    verified = json.loads(cli(repo_root, "overlay", "status", "--verify", "--json", *jd, str(base_image)).stdout)
    assert verified["state"] == "clean" and verified["actual_digest"] == verified["recorded_digest"]
    rec = cli(repo_root, "recover", "--json", *jd, str(base_image))
    assert rec.returncode == 0
    assert json.loads(rec.stdout)["outcomes"][0]["outcome"] == "nothing"
    assert not journal.exists() or os.listdir(journal) == []


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path, vectors: Path, overlay_image: Path, repo_root: Path) -> None:
    native = tmp_path / "busybox.sif"
    shutil.copyfile(vectors / "singularity/busybox_amd64.sif", native)
    out = cli(repo_root, "overlay", "create", "--journal-dir", str(tmp_path / "j"), str(native))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"sifoverlay: {native}: native SIF")
    modify_overlay(overlay_image, tmp_path)
    held = lease.acquire(overlay_image, lease.Holder.current("job-31", "slurm"))
    try:
        busy = cli(repo_root, "overlay", "sync", "--journal-dir", str(tmp_path / "j"), str(overlay_image))
        assert busy.returncode == 75 and "job-31" in busy.stderr and busy.stderr.count("\n") == 1
        st = json.loads(cli(repo_root, "overlay", "status", "--json", str(overlay_image)).stdout)
        assert st["state"] == "in-use" and "job-31" in st["holder"]["detail"]
    finally:
        held.release()
    missing = cli(repo_root, "overlay", "status", str(tmp_path / "nope.sif"))
    assert missing.returncode == 2 and "nope.sif" in missing.stderr


def test_recover_cli_without_images_and_nothing_pending(tmp_path: Path, repo_root: Path) -> None:
    out = cli(repo_root, "recover", "--journal-dir", str(tmp_path / "empty"))
    assert (out.returncode, out.stdout) == (0, "nothing to recover\n")


def test_sync_draws_a_progress_bar_only_on_a_tty(overlay_image: Path, tmp_path: Path, repo_root: Path) -> None:
    require_tool("script", "debugfs")
    modify_overlay(overlay_image, tmp_path)
    command = f"{sys.executable} -m sifoverlay overlay sync --journal-dir {tmp_path / 'j'} {overlay_image}"
    tty = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=repo_root, capture_output=True, text=True,
                         timeout=300)
    assert tty.returncode == 0
    assert "hashing overlay [" in tty.stdout and "100.0% 0.06/0.06 GiB" in tty.stdout
    assert tty.stdout.rstrip().endswith(")")  # the result line comes after the bar's line
    modify_overlay(overlay_image, tmp_path, b"again\n", name="upper/again")
    plain = cli(repo_root, "overlay", "sync", "--journal-dir", str(tmp_path / "j"), str(overlay_image))
    assert plain.returncode == 0 and plain.stderr == "" and ": reconciled" in plain.stdout
