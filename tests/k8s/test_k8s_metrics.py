"""The operator's /metrics endpoint, linted by promtool and scraped by a real Prometheus
(Debian's prometheus 2.42 on 127.0.0.1) while the operator reconciles an image."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.k8s.conftest import Cluster, Site, free_port, wait_for, write_into_overlay

pytestmark = [pytest.mark.k8s, pytest.mark.prometheus]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def try_scrape(port: int) -> str:
    try:
        return scrape(port)
    except OSError:
        return ""  # the operator's startup handler has not bound the port yet


def sample(text: str, name: str, labels: str = "") -> float:
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def prometheus(site: Site, tmp_path: Path) -> Iterator[int]:
    require_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: sifoverlay-operator\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{site.metrics_port}']}}]\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]
    except OSError:
        return []  # not up yet


def test_metrics_endpoint_passes_promtool(site: Site, operator: object) -> None:
    require_tool("promtool")
    text = wait_for("metrics endpoint", lambda: try_scrape(site.metrics_port))
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("sifoverlay_operator_") for n in names)
    assert 'sifoverlay_operator_build_info{version="0.1.0"} 1.0' in text


def test_prometheus_scrapes_the_reconcile_and_the_drift(site: Site, cluster: Cluster, vectors: Path, operator: object,
                                                       prometheus: int) -> None:
    image = site.make_image(vectors)
    before = wait_for("metrics endpoint", lambda: try_scrape(site.metrics_port))  # counters live in the process: compare with the start
    reconciled0 = sample(before, "sifoverlay_operator_reconciles_total", 'result="reconciled"')
    ended0 = sample(before, "sifoverlay_operator_workloads_ended_total", 'result="Succeeded"')
    cluster.create_overlayjob("measured")
    pod = cluster.start_pod(cluster.wait_job("measured-run"))
    write_into_overlay(image, "m.txt", b"measured\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("measured-run", "Complete")
    cluster.wait_phase("measured", "Succeeded")
    expr = 'sifoverlay_operator_reconciles_total{job="sifoverlay-operator",result="reconciled"}'
    seen = wait_for("Prometheus sample", lambda: [r for r in query(prometheus, expr)
                                                  if float(r["value"][1]) == reconciled0 + 1], timeout=60)
    assert seen[0]["metric"]["instance"] == f"127.0.0.1:{site.metrics_port}"
    ended = query(prometheus, 'sifoverlay_operator_workloads_ended_total{result="Succeeded"}')
    assert float(ended[0]["value"][1]) == ended0 + 1
    assert query(prometheus, 'sifoverlay_operator_reconcile_duration_seconds_count') != []
    # an overlay changed behind the operator's back shows up as a drifted resource
    write_into_overlay(image, "sneaky.txt", b"x\n", site.work)
    wait_for("drift gauge", lambda: [r for r in query(prometheus, "sifoverlay_operator_drifted_overlayjobs")
                                     if float(r["value"][1]) >= 1], timeout=60)
    # the gauge is set just before the status write: wait for the condition too
    wait_for("DriftDetected", lambda: cluster.condition("measured", "DriftDetected").get("status") == "True")
