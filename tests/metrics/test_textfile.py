"""Textfile output: atomic + durable writes through the io seam, counters that survive
processes and concurrent writers, valid exposition (promtool), typed errors."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from sifoverlay.errors import ImageBusy, UsageError
from sifoverlay.fsio import CountingIO, SimulatedCrash
from sifoverlay.metrics import events, textfile
from tests.metrics.conftest import promtool_check_metrics


def _registry(value: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("sifoverlay_test_value", "A test gauge.", registry=registry).set(value)
    return registry


def test_write_is_temp_fsync_rename_fsync_dir(tmp_path: Path) -> None:
    io = CountingIO(keep_log=True)
    path = textfile.write(tmp_path, _registry(3), "x.prom", io=io)
    assert path == str(tmp_path / "x.prom")
    ops = [op for op, _ in io.log]
    assert ops == ["open", "pwrite", "fsync", "rename", "fsync_dir"]
    tmp_name = io.log[0][1]["path"]
    assert os.path.dirname(str(tmp_name)) == str(tmp_path)
    assert not str(tmp_name).endswith(".prom")  # node_exporter never reads the temp file
    assert io.log[3][1] == {"src": tmp_name, "dst": path}
    assert (tmp_path / "x.prom").read_text().endswith("sifoverlay_test_value 3.0\n")
    assert sorted(os.listdir(tmp_path)) == ["x.prom"]


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_crash_before_rename_keeps_the_old_file(tmp_path: Path, crash_at: int) -> None:
    textfile.write(tmp_path, _registry(1), "x.prom")
    old = (tmp_path / "x.prom").read_bytes()
    with pytest.raises(SimulatedCrash):
        textfile.write(tmp_path, _registry(2), "x.prom", io=CountingIO(crash_at))
    assert (tmp_path / "x.prom").read_bytes() == old


@pytest.mark.parametrize("name", ["x.txt", "../x.prom", ".x.prom", "a/b.prom"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError) as info:
        textfile.write(tmp_path, _registry(1), name)
    assert "textfile name must be a plain file name ending in .prom" in str(info.value)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path}/nope: textfile directory does not exist$"):
        textfile.write(tmp_path / "nope", _registry(1), "x.prom")


def _sync_result(action: str, seconds: float, hashed: int) -> object:
    from sifoverlay.engine import SyncResult

    return SyncResult(action, "/img", "sha256:a", "sha256:b", hashed, seconds, False)


def _samples(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in textfile.read(directory, events.DEFAULT_NAME):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_events_accumulate_across_calls(tmp_path: Path) -> None:
    assert events.record_result(tmp_path, "sync", _sync_result("reconciled", 0.3, 1000)) == str(
        tmp_path / events.DEFAULT_NAME)
    events.record_result(tmp_path, "sync", _sync_result("noop", 0.002, 0))
    events.record_result(tmp_path, "sync", ImageBusy("/img", "held by job 7", holder={}), seconds=0.01)
    events.record_result(tmp_path, "sync", RuntimeError("boom"))
    events.record_result(tmp_path, "sync", _sync_result("reconciled", 40.0, 5000))
    from sifoverlay.engine import RecoverOutcome

    events.record_result(tmp_path, "recover", [RecoverOutcome("/img", "sync", "rolled-forward", ""),
                                               RecoverOutcome("/img2", None, "failed", "changed")])
    events.record_result(tmp_path, "break-stale", True)
    events.record_result(tmp_path, "break-stale", False)
    got = _samples(tmp_path)
    assert got[("sifoverlay_reconciles_total", (("result", "reconciled"),))] == 2
    assert got[("sifoverlay_reconciles_total", (("result", "noop"),))] == 1
    assert got[("sifoverlay_reconciles_total", (("result", "busy"),))] == 1
    assert got[("sifoverlay_reconciles_total", (("result", "failed"),))] == 1
    assert got[("sifoverlay_reconciles_total", (("result", "replayed-and-reconciled"),))] == 0
    # durations: 0.002, 0.01, 0.3, 40.0 (the "failed" call gave none)
    assert got[("sifoverlay_reconcile_duration_seconds_count", ())] == 4
    assert got[("sifoverlay_reconcile_duration_seconds_sum", ())] == pytest.approx(40.312)
    assert got[("sifoverlay_reconcile_duration_seconds_bucket", (("le", "0.01"),))] == 2
    assert got[("sifoverlay_reconcile_duration_seconds_bucket", (("le", "0.5"),))] == 3
    assert got[("sifoverlay_reconcile_duration_seconds_bucket", (("le", "30.0"),))] == 3
    assert got[("sifoverlay_reconcile_duration_seconds_bucket", (("le", "60.0"),))] == 4
    assert got[("sifoverlay_reconcile_duration_seconds_bucket", (("le", "+Inf"),))] == 4
    assert got[("sifoverlay_hashed_bytes_total", (("source", "reconcile"),))] == 6000
    assert got[("sifoverlay_recoveries_total", (("outcome", "rolled-forward"),))] == 1
    assert got[("sifoverlay_recoveries_total", (("outcome", "failed"),))] == 1
    assert got[("sifoverlay_recoveries_total", (("outcome", "completed"),))] == 0
    assert got[("sifoverlay_stale_leases_broken_total", ())] == 1
    proc = promtool_check_metrics((tmp_path / events.DEFAULT_NAME).read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == [".sifoverlay_events.prom.lock", "sifoverlay_events.prom"]


def _child(directory: str, n: int) -> None:
    for _ in range(n):
        assert events.record_result(directory, "sync", _sync_result("reconciled", 0.1, 10)) is not None


def test_concurrent_processes_all_count(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(str(tmp_path), 15)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = _samples(tmp_path)
    assert got[("sifoverlay_reconciles_total", (("result", "reconciled"),))] == 60
    assert got[("sifoverlay_hashed_bytes_total", (("source", "reconcile"),))] == 600


def test_recording_never_raises_and_never_overwrites_a_foreign_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert events.record_result(tmp_path / "missing", "sync", _sync_result("noop", 0.1, 0)) is None
    assert events.record_result(None, "sync", _sync_result("noop", 0.1, 0)) is None  # not configured
    foreign = tmp_path / events.DEFAULT_NAME
    foreign.write_text("this is { not exposition\n")
    assert events.record_result(tmp_path, "sync", _sync_result("noop", 0.1, 0)) is None
    assert foreign.read_text() == "this is { not exposition\n"
    assert "not a Prometheus text exposition file" in caplog.text
    assert events.record_result(tmp_path, "frobnicate", 1) is None


def test_env_names_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(events.ENV_TEXTFILE_DIR, str(tmp_path))
    assert textfile.record_result(None, "break-stale", 3) == str(tmp_path / events.DEFAULT_NAME)
    assert _samples(tmp_path)[("sifoverlay_stale_leases_broken_total", ())] == 3


def test_unknown_label_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown reconcile result 'job-1234'"):
        events.apply(tmp_path, events.Increment(reconciles={"job-1234": 1}))
    assert not (tmp_path / events.DEFAULT_NAME).exists()
