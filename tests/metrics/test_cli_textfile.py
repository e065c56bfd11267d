"""`--textfile-dir` on the mutating CLI verbs: the events textfile counts each outcome,
including refusals, and the env variable works the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sifoverlay.engine import lease
from sifoverlay.metrics import events, textfile
from tests.metrics.conftest import write_with_debugfs


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sifoverlay", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})), timeout=120)


def counts(directory: Path) -> dict[str, float]:
    out = {}
    for family in textfile.read(directory, events.DEFAULT_NAME):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{label}}}"] = s.value
    return out


def test_sync_and_recover_count_their_outcomes(image: Path, tmp_path: Path) -> None:
    tf = tmp_path / "textfile"
    tf.mkdir()
    write_with_debugfs(image, tmp_path)
    proc = cli("overlay", "sync", "--textfile-dir", str(tf), str(image))
    assert proc.returncode == 0 and ": reconciled (" in proc.stdout, proc.stderr
    proc = cli("overlay", "sync", str(image), env={"SIFOVERLAY_TEXTFILE_DIR": str(tf)})
    assert proc.returncode == 0 and ": noop (" in proc.stdout, proc.stderr
    write_with_debugfs(image, tmp_path, name="upper/two")
    held = lease.acquire(image, lease.Holder.current("4711", "test"))
    try:
        proc = cli("overlay", "sync", "--textfile-dir", str(tf), str(image))
    finally:
        held.release()
    assert proc.returncode == 75, proc.stderr
    proc = cli("recover", "--textfile-dir", str(tf))
    assert proc.returncode == 0 and proc.stdout == "nothing to recover\n", proc.stderr
    got = counts(tf)
    assert got["sifoverlay_reconciles_total{result=reconciled}"] == 1
    assert got["sifoverlay_reconciles_total{result=noop}"] == 1
    assert got["sifoverlay_reconciles_total{result=busy}"] == 1
    assert got["sifoverlay_reconciles_total{result=failed}"] == 0
    assert got["sifoverlay_reconcile_duration_seconds_count{}"] == 3
    assert got["sifoverlay_hashed_bytes_total{source=reconcile}"] == 64 << 20
    assert sum(v for k, v in got.items() if k.startswith("sifoverlay_recoveries_total")) == 0
    assert got["sifoverlay_textfile_last_event_timestamp_seconds{}"] > 0


def test_unwritable_textfile_dir_does_not_fail_the_sync(image: Path, tmp_path: Path) -> None:
    proc = cli("overlay", "sync", "--textfile-dir", str(tmp_path / "missing"), str(image))
    assert proc.returncode == 0 and ": noop (" in proc.stdout
    assert f"cannot record metrics in {tmp_path}/missing/sifoverlay_events.prom" in proc.stderr
