"""The Slurm hooks' metrics, without the Slurm cluster: the Epilog's own gauges
(`sifoverlay_slurm.prom`) and the events textfile counters (`sifoverlay_events.prom`)
written by jobend (every sync) and the sweeper (stale leases broken, `recover --slurm`).

Real images (busybox OCI-SIF + sparse 64 MiB ext3 overlay), real writes through
debugfs -w, real leases taken by a process that then exits (as the Prolog does), the
real Epilog run as a process. Only slurmctld's answer "is job N over?" is given by a
fixed table (the sweeper's JobState protocol), since the shared cluster is not used here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.epilog import TEXTFILE_NAME, write_metrics
from sifoverlay.slurm.jobend import JobEndOutcome, finish_job

from tests.conftest import REPO, require_tool

pytest.importorskip("prometheus_client")

EVENTS = "sifoverlay_events.prom"
RESULTS = ("noop", "reconciled", "replayed-and-reconciled", "busy", "failed")


def _samples(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _promtool_ok(path: Path) -> None:
    require_tool("promtool")
    proc = subprocess.run(["promtool", "check", "metrics"], input=path.read_text(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _reconciles(samples: dict[str, float]) -> dict[str, float]:
    return {r: samples[f'sifoverlay_reconciles_total{{result="{r}"}}'] for r in RESULTS}


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def textdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "textfile"
    path.mkdir()
    monkeypatch.setenv("SIFOVERLAY_TEXTFILE_DIR", str(path))
    return path


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SlurmConfig:
    """Lease records in a private state directory, for the hooks (config) and for the helper
    processes and checks of these tests (environment)."""
    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))
    return SlurmConfig(journal_dir=str(tmp_path / "journal"), runtime_dir=str(tmp_path / "run"),
                       state_dir=str(tmp_path / "state"), epilog_reconcile="sync")


@pytest.fixture
def overlay_image(imported_image: Path, tmp_path: Path) -> Path:
    """A fresh busybox OCI-SIF with a sparse 64 MiB overlay (recorded digest = clean)."""
    require_tool("mkfs.ext3")
    from sifoverlay.engine import create_overlay

    target = tmp_path / "images" / "img.oci.sif"
    target.parent.mkdir()
    subprocess.run(["cp", "--sparse=always", str(imported_image), str(target)], check=True)
    create_overlay(target, size_mib=64, sparse=True, journal_dir=str(tmp_path / "create-journal"))
    return target


def _overlay_size(image: Path) -> int:
    from sifoverlay.ocisif import open_image

    with open_image(image) as img:
        assert img.overlay is not None
        return img.overlay.size


def _write_with_debugfs(image: Path, tmp: Path, name: str = "upper/hello") -> None:
    require_tool("debugfs")
    from sifoverlay.ocisif import open_image

    with open_image(image) as img:
        assert img.overlay is not None
        offset = img.overlay.offset
    payload = tmp / "payload"
    payload.write_bytes(b"written by the job\n")
    done = subprocess.run(["debugfs", "-w", "-R", f"write {payload} {name}", f"{image}?offset={offset}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _lease_by_exited_process(image: Path, job_id: str, *, ttl: float) -> None:
    """Take the writer lease as job `job_id` in a process that exits without releasing it,
    as the Prolog does (ttl of a year: live until released; a short ttl: stale once expired)."""
    code = ("import os, socket, sys\nfrom sifoverlay.engine import lease\n"
            "lease.acquire(sys.argv[1], lease.Holder(socket.gethostname(), os.getpid(), sys.argv[2], 'slurm'),"
            " ttl=float(sys.argv[3]))\nos._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code, str(image), job_id, str(ttl)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _start_session(config: SlurmConfig, job_id: str, image: Path, mode: str = "rw") -> None:
    from sifoverlay.engine import sessions

    st = os.stat(image)
    sessions.start(config.journal_dir, job_id, image, mode=mode, host=socket.gethostname(), uid=os.getuid(),
                   source="slurm", details={"dev": st.st_dev, "ino": st.st_ino})


@dataclass
class FixedJobState:
    """slurmctld's answer, fixed: the jobs in `over` have ended, all others run."""

    over: frozenset[str]
    name: str = "fixed"

    def is_alive(self, job_id: str) -> bool | None:
        return job_id not in self.over


# -- the Epilog's own gauges -----------------------------------------------------------------
def test_failed_reconcile_raises_the_metric(tmp_path: Path, textdir: Path) -> None:
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
    _promtool_ok(textdir / TEXTFILE_NAME)


def test_slurm_gauges_come_from_the_names_table(tmp_path: Path, textdir: Path) -> None:
    from sifoverlay.metrics import names

    write_metrics(JobEndOutcome("9", "/i.sif", "noop", "record"), SlurmConfig(journal_dir=str(tmp_path / "j")))
    text = (textdir / TEXTFILE_NAME).read_text()
    for spec in (names.SLURM_JOB_END, names.SLURM_JOB_END_FAILED, names.SLURM_OPEN_SESSIONS):
        assert f"# HELP {spec.name} {spec.help}\n# TYPE {spec.name} {spec.type}\n" in text
    assert names.SLURM_JOB_END.labels == ("result",)
    assert "noop" in names.JOB_END_RESULTS and "failed" in names.JOB_END_RESULTS


def test_no_textfile_directory_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIFOVERLAY_TEXTFILE_DIR", str(tmp_path / "absent"))
    assert write_metrics(JobEndOutcome("7", None, "noop", "record"), SlurmConfig()) is False
    assert not (tmp_path / "absent").exists()


# -- events counted by jobend (Epilog and sweeper) -------------------------------------------
def test_finish_job_counts_reconciled_noop_and_busy(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path
) -> None:
    # Job 41 wrote into the overlay: its end reconciles (hashes the whole overlay).
    _lease_by_exited_process(overlay_image, "41", ttl=365 * 24 * 3600.0)
    _start_session(config, "41", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path)
    done = finish_job("41", config, reason="epilog")
    assert (done.result, done.step) == ("reconciled", "record"), done
    samples = _samples(textdir / EVENTS)
    assert _reconciles(samples) == {"noop": 0, "reconciled": 1, "replayed-and-reconciled": 0, "busy": 0, "failed": 0}
    assert samples['sifoverlay_hashed_bytes_total{source="reconcile"}'] == _overlay_size(overlay_image)
    assert samples["sifoverlay_reconcile_duration_seconds_count"] == 1
    assert samples['sifoverlay_reconcile_duration_seconds_bucket{le="+Inf"}'] == 1
    assert 0 < samples["sifoverlay_reconcile_duration_seconds_sum"] < 300
    assert samples["sifoverlay_stale_leases_broken_total"] == 0
    _promtool_ok(textdir / EVENTS)

    # Job 42 wrote nothing: a no-op sync, counted, nothing hashed.
    _lease_by_exited_process(overlay_image, "42", ttl=365 * 24 * 3600.0)
    _start_session(config, "42", overlay_image)
    assert finish_job("42", config, reason="sweeper").result == "noop"
    samples = _samples(textdir / EVENTS)
    assert _reconciles(samples) == {"noop": 1, "reconciled": 1, "replayed-and-reconciled": 0, "busy": 0, "failed": 0}
    assert samples['sifoverlay_hashed_bytes_total{source="reconcile"}'] == _overlay_size(overlay_image)
    assert samples["sifoverlay_reconcile_duration_seconds_count"] == 2

    # Job 43's session is open but a live writer (this process, not job 43) holds the
    # image: the sync is refused (busy), counted, and the job end fails for the sweeper.
    from sifoverlay.engine import lease

    _start_session(config, "43", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path, "upper/again")
    held = lease.acquire(overlay_image, lease.Holder.current("cli-sync", "cli"))
    try:
        busy = finish_job("43", config, reason="epilog")
    finally:
        held.release()
    assert (busy.result, busy.step) == ("failed", "sync"), busy
    samples = _samples(textdir / EVENTS)
    assert _reconciles(samples) == {"noop": 1, "reconciled": 1, "replayed-and-reconciled": 0, "busy": 1, "failed": 0}
    assert samples["sifoverlay_reconcile_duration_seconds_count"] == 3  # refusals are timed too
    _promtool_ok(textdir / EVENTS)


def test_finish_job_without_textfile_dir_writes_nothing(
    overlay_image: Path, config: SlurmConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "no-such-dir"
    monkeypatch.setenv("SIFOVERLAY_TEXTFILE_DIR", str(absent))
    _lease_by_exited_process(overlay_image, "44", ttl=365 * 24 * 3600.0)
    _start_session(config, "44", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path)
    assert finish_job("44", config, reason="epilog").result == "reconciled"
    assert not absent.exists()


def test_epilog_exits_0_and_reconciles_when_the_events_textfile_is_broken(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path
) -> None:
    """A textfile that cannot be parsed is never overwritten, and never fails the Epilog."""
    garbage = "this is { not a textfile\n"
    (textdir / EVENTS).write_text(garbage)
    _lease_by_exited_process(overlay_image, "45", ttl=365 * 24 * 3600.0)
    _start_session(config, "45", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path)
    plugstack = tmp_path / "plugstack.conf"
    plugstack.write_text(f"required /usr/lib/sifoverlay/sifoverlay_spank.so journal_dir={config.journal_dir} "
                         f"runtime_dir={config.runtime_dir} state_dir={config.state_dir} epilog_reconcile=sync\n")
    env = {**os.environ, "SLURM_JOB_ID": "45", "SIFOVERLAY_PLUGSTACK": str(plugstack),
           "SIFOVERLAY_TEXTFILE_DIR": str(textdir), "SIFOVERLAY_SLURM_LOG": str(tmp_path / "slurm.log")}
    done = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "sifoverlay.slurm.epilog"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cannot record metrics" in done.stderr and EVENTS in done.stderr, done.stderr
    assert (textdir / EVENTS).read_text() == garbage
    from sifoverlay.engine import sessions, status

    assert sessions.load(config.journal_dir, "45") is None  # the job end itself went through
    assert status(overlay_image).state == "clean"
    samples = _samples(textdir / TEXTFILE_NAME)  # the Epilog's own gauges are unaffected
    assert samples["sifoverlay_slurm_job_end_failed"] == 0
    assert 'sifoverlay_slurm_job_end_timestamp_seconds{result="reconciled"}' in samples


# -- events counted by the sweeper ------------------------------------------------------------
def test_sweeper_breaks_a_stale_lease_after_a_finished_job_and_counts_it(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path
) -> None:
    """Job 46 (read-only) is over; a crashed `overlay sync` left a stale writer lease on its
    image. The sweeper finishes the job, breaks the stale lease, and counts one break."""
    import time

    from sifoverlay.engine import lease
    from sifoverlay.slurm.sweeper import sweep

    _start_session(config, "46", overlay_image, mode="ro")
    elsewhere = tmp_path / "elsewhere.oci.sif"
    elsewhere.touch()
    _start_session(config, "47", elsewhere, mode="rw")  # job still running: left alone
    _lease_by_exited_process(overlay_image, "cli-crashed", ttl=0.05)
    time.sleep(0.2)  # past its ttl; its process is gone
    stale = lease.inspect(overlay_image)
    assert stale is not None and not stale.is_alive()
    report = sweep(config, FixedJobState(frozenset({"46"})), textfile_dir=str(textdir))
    assert [(o.job_id, o.result) for o in report.outcomes] == [("46", "released")]
    assert report.skipped == [("47", "job still alive")]
    assert report.stale_broken == [str(overlay_image)]
    assert lease.inspect(overlay_image) is None
    samples = _samples(textdir / EVENTS)
    assert samples["sifoverlay_stale_leases_broken_total"] == 1
    assert sum(_reconciles(samples).values()) == 0  # a read-only job end syncs nothing
    _promtool_ok(textdir / EVENTS)

    # A second sweep finds nothing stale: the counter stays.
    assert sweep(config, FixedJobState(frozenset({"46"})), textfile_dir=str(textdir)).stale_broken == []
    assert _samples(textdir / EVENTS)["sifoverlay_stale_leases_broken_total"] == 1


def test_sweeper_keeps_the_lease_of_a_job_whose_end_failed(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path
) -> None:
    """Job 48's reconcile fails (its image was replaced by another file): its stale-looking
    lease must stay for the next sweep, and no break is counted."""
    from sifoverlay.engine import lease
    from sifoverlay.slurm.sweeper import sweep

    from sifoverlay.engine import statedir

    _lease_by_exited_process(overlay_image, "48", ttl=0.05)
    _start_session(config, "48", overlay_image)
    key = statedir.key_of_path(str(overlay_image))  # leases belong to the inode, not the name
    replaced = overlay_image.with_suffix(".new")
    shutil.copy(overlay_image, replaced)
    os.replace(replaced, overlay_image)  # same path, another inode: verify refuses
    report = sweep(config, FixedJobState(frozenset({"48"})), textfile_dir=str(textdir))
    assert [(o.job_id, o.result, o.step) for o in report.outcomes] == [("48", "failed", "verify")]
    assert report.stale_broken == []
    assert lease.inspect(key=key) is not None  # job 48's lease on the authorized inode stays
    assert lease.inspect(overlay_image) is None  # the file now at that path is another image
    assert not (textdir / EVENTS).exists()  # no sync ran, nothing broken: nothing to count


def test_recover_slurm_counts_the_recoveries(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path
) -> None:
    """`sifoverlay recover --slurm IMAGE`: no open session (the job state backend is never
    asked), plain recovery of the image finds nothing unfinished: one "nothing" counted."""
    import argparse
    import io as stdio

    from sifoverlay.engine.recover import recover
    from sifoverlay.fsio import REAL_IO
    from sifoverlay.slurm.sweeper import recover_slurm

    plugstack = tmp_path / "plugstack.conf"
    plugstack.write_text(f"required /usr/lib/sifoverlay/sifoverlay_spank.so journal_dir={config.journal_dir} "
                         f"runtime_dir={config.runtime_dir} state_dir={config.state_dir}\n")
    args = argparse.Namespace(plugstack=str(plugstack), backend="cli", images=[str(overlay_image)],
                              journal_dir=None, json=False, textfile_dir=str(textdir))
    out = stdio.StringIO()
    assert recover_slurm(args, recover=recover, io=REAL_IO, out=out) == 0, out.getvalue()
    samples = _samples(textdir / EVENTS)
    recoveries = {o: samples[f'sifoverlay_recoveries_total{{outcome="{o}"}}']
                  for o in ("rolled-forward", "rolled-back", "completed", "nothing", "failed")}
    assert recoveries == {"rolled-forward": 0, "rolled-back": 0, "completed": 0, "nothing": 1, "failed": 0}
    _promtool_ok(textdir / EVENTS)
