"""The runbook covers every alert the chart ships, and the comparison page names the
command that produced its figures."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO


def test_every_alert_has_a_runbook_section() -> None:
    # the drift/engine rules and the operator's own rules, each with a section in the runbook
    files = [REPO / "charts" / "sifoverlay" / "files" / name for name in ("prometheus-rules.yml", "operator-rules.yml")]
    alerts = [rule["alert"] for path in files for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 10
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


def _tracked_text_files() -> list[str]:
    import subprocess

    done = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    return [name for name in done.stdout.split("\0") if name]


def test_no_absolute_path_of_this_checkout_in_tracked_files() -> None:
    """Code, tests, docs and scripts name files relative to the repository (or through
    $SIFOVERLAY_VECTORS): a clone at any other path works the same."""
    needles = (str(REPO) + "/", str(REPO.parent / "shared") + "/")
    found = []
    for name in _tracked_text_files():
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        found += [f"{name}: {needle}" for needle in needles if needle in text]
    assert len(_tracked_text_files()) > 100 and found == []
