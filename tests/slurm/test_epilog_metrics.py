"""The Epilog's textfile metrics (node_exporter textfile collector), written through
sifoverlay.metrics.textfile. No cluster: the outcome is built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.epilog import TEXTFILE_NAME, write_metrics
from sifoverlay.slurm.jobend import JobEndOutcome

pytest.importorskip("prometheus_client")


def _samples(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_failed_reconcile_raises_the_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    monkeypatch.setenv("SIFOVERLAY_TEXTFILE_DIR", str(textdir))
    config = SlurmConfig(journal_dir=str(tmp_path / "journal"))
    failed = JobEndOutcome("7", "/i.sif", "failed", "sync", "boom")
    assert write_metrics(failed, config) is True
    samples = _samples(textdir / TEXTFILE_NAME)
    assert samples["sifoverlay_slurm_job_end_failed"] == 1.0
    assert samples["sifoverlay_slurm_open_sessions"] == 0.0
    assert samples['sifoverlay_slurm_job_end_timestamp_seconds{result="failed"}'] > 1.7e9
    ok = JobEndOutcome("8", "/i.sif", "reconciled", "record")
    assert write_metrics(ok, config) is True
    samples = _samples(textdir / TEXTFILE_NAME)
    assert samples["sifoverlay_slurm_job_end_failed"] == 0.0
    assert 'sifoverlay_slurm_job_end_timestamp_seconds{result="reconciled"}' in samples


def test_no_textfile_directory_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIFOVERLAY_TEXTFILE_DIR", str(tmp_path / "absent"))
    assert write_metrics(JobEndOutcome("7", None, "noop", "record"), SlurmConfig()) is False
    assert not (tmp_path / "absent").exists()
