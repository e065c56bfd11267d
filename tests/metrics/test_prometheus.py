"""End to end with a real Prometheus (Debian 2.42) on loopback: it scrapes `sifoverlay
exporter` and a real node_exporter reading the CLI's textfile, and loads our alert rules.

A write through a real rw FUSE mount turns the state to `modified`, the verify pass
(SIGUSR1) to `drift`, `sifoverlay overlay sync --textfile-dir` back to `clean` and moves
the reconcile counter; all observed through Prometheus's HTTP API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.metrics.conftest import (
    PromStack,
    exporter_log,
    port_is_free,
    promtool_check_metrics,
    scrape,
    stop_process,
    wait_until,
    write_with_fuse2fs,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def state_expr(image: Path, state: str) -> str:
    return f'sifoverlay_overlay_state{{job="sifoverlay-exporter",image="{image}",state="{state}"}}'


def cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sifoverlay", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120)


def test_drift_lifecycle_seen_by_prometheus(prom: PromStack, run_exporter, image: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                            journal_dir: Path) -> None:
    exporter = run_exporter(image.parent)
    try:
        prom.wait_value(state_expr(image, "clean"), 1)
        size = prom.value(f'sifoverlay_overlay_size_bytes{{image="{image}"}}')
        assert size == 64 << 20
        assert prom.value('sifoverlay_build_info{job="sifoverlay-exporter",version="0.1.0"}') == 1
        reconciled = f'sifoverlay_reconciles_total{{job="node",result="reconciled"}}'
        before = prom.value(reconciled) or 0.0

        write_with_fuse2fs(image, tmp_path / "mnt", content=b"written by a job\n")
        prom.wait_value(state_expr(image, "modified"), 1)
        assert prom.value(state_expr(image, "clean")) == 0
        assert prom.value('sifoverlay_exporter_verify_queue_images{job="sifoverlay-exporter"}') == 1

        exporter.send_signal(signal.SIGUSR1)  # verify now
        prom.wait_value(state_expr(image, "drift"), 1)
        prom.wait_value('sifoverlay_hashed_bytes_total{job="sifoverlay-exporter",source="verify"}', 64 << 20)

        proc = cli("overlay", "sync", "--textfile-dir", str(prom.textfile_dir), "--journal-dir", str(journal_dir),
                   str(image))
        assert proc.returncode == 0, proc.stderr
        assert ": reconciled (sha256:" in proc.stdout
        assert "cannot record metrics" not in proc.stderr, proc.stderr
        events = (prom.textfile_dir / "sifoverlay_events.prom").read_text()
        assert f'sifoverlay_reconciles_total{{result="reconciled"}} {before + 1}' in events, events
        prom.wait_value(state_expr(image, "clean"), 1)
        prom.wait_value(reconciled, before + 1)
        assert prom.value(state_expr(image, "drift")) == 0
        hashed = prom.value('sifoverlay_hashed_bytes_total{job="node",source="reconcile"}')
        assert hashed is not None and hashed >= 64 << 20
        # the new last-reconcile time is the file's (the commit was its last write)
        prom.wait_value(f'sifoverlay_overlay_last_reconcile_timestamp_seconds{{image="{image}"}}',
                        os.stat(image).st_mtime)
    finally:
        rc = stop_process(exporter)
    assert rc == 0, exporter_log(tmp_path)
    assert port_is_free(prom.exporter_port)
    assert "Traceback" not in exporter_log(tmp_path)


def test_exporter_exposition_is_valid_and_rules_are_loaded(prom: PromStack, run_exporter, image: Path,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    exporter = run_exporter(image)
    try:
        text = wait_until("exporter serving", lambda: _try_scrape(prom.exporter_port), timeout=20)
        assert f'sifoverlay_overlay_state{{image="{image}",state="clean"}} 1.0' in str(text)
        proc = promtool_check_metrics(str(text))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        groups = prom.get("/api/v1/rules")["data"]["groups"]  # type: ignore[index]
        alerts = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"SifoverlayOverlayDrift", "SifoverlayJournalEntryStuck", "SifoverlayReconcileFailed",
                "SifoverlayStaleLease"} <= alerts
        assert all(rule["health"] == "ok" for group in groups for rule in group["rules"])
    finally:
        assert stop_process(exporter) == 0, exporter_log(tmp_path)


def test_sigterm_shuts_down_cleanly_and_releases_the_port(prom: PromStack, run_exporter, image: Path,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    exporter = run_exporter(image)
    wait_until("exporter serving", lambda: _try_scrape(prom.exporter_port), timeout=20)
    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(15) == 0
    assert port_is_free(prom.exporter_port)
    log = exporter_log(tmp_path)
    assert "signal 15: shutting down" in log and "exporter stopped" in log
    assert "Traceback" not in log


def test_port_in_use_is_one_line_error(prom: PromStack, run_exporter, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = run_exporter(image)
    try:
        wait_until("exporter serving", lambda: _try_scrape(prom.exporter_port), timeout=20)
        proc = cli("exporter", "--scan", str(image), "--listen", f"127.0.0.1:{prom.exporter_port}")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"sifoverlay: cannot listen on 127.0.0.1:{prom.exporter_port}: Address already in use"]
    finally:
        assert stop_process(first) == 0


def _try_scrape(port: int) -> str | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_dashboard_queries_are_valid_promql_over_our_metrics(prom: PromStack, repo_root: Path) -> None:
    import json
    import re

    from sifoverlay.metrics import names

    dashboard = json.loads((repo_root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    known = {spec.sample_name for spec in names.ALL}
    known |= {names.RECONCILE_DURATION.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    known.add("sifoverlay_build_info")
    for expr in exprs:
        used = set(re.findall(r"sifoverlay_[a-z_]+", expr))
        assert used and used <= known, (expr, used - known)
        concrete = expr.replace("$job", ".*").replace("$__rate_interval", "1m")
        prom.query(concrete)  # asserts status == success: Prometheus parsed and ran it
