"""The runbook covers every alert the chart ships, and the comparison page names the
command that produced its figures."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO


def test_every_alert_has_a_runbook_section() -> None:
    rules = yaml.safe_load((REPO / "charts" / "sifoverlay" / "files" / "prometheus-rules.yml").read_text())
    alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 5
    runbook = (REPO / "docs" / "operations.md").read_text()
    sections = set(re.findall(r"^### (\w+)", runbook, flags=re.M))
    assert [a for a in alerts if a not in sections] == []
    assert sorted(s for s in sections if s.startswith("Sifoverlay")) == sorted(alerts)  # no stale sections


def test_comparison_cites_its_command_and_marks_rows() -> None:
    text = (REPO / "docs" / "comparison.md").read_text()
    assert "bench/compare_sync.py" in text
    rows = [line for line in text.split("## Feature table", 1)[1].splitlines() if line.startswith("| ") and "---" not in line][1:]
    unmarked = [row for row in rows if not any(word in row for word in ("measured", "cited", "tested", "n/a"))]
    assert len(rows) >= 8 and unmarked == []
