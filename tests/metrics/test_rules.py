"""The canonical alert rules: valid for promtool and passing their unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_tool
from tests.metrics.conftest import RULES

RULES_TEST = Path(__file__).with_name("rules_test.yml")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool("promtool")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_rules_file_is_valid() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout


def test_rules_unit_tests_pass() -> None:
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_and_uses_only_our_metrics() -> None:
    from sifoverlay.metrics import names

    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert {r["alert"] for r in rules} == tested
    known = {spec.sample_name for spec in names.ALL}
    for rule in rules:
        used = {word for word in _identifiers(rule["expr"]) if word.startswith("sifoverlay_")}
        assert used and used <= known, (rule["alert"], used - known)


def test_promtool_fails_on_a_broken_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one wrong expected label does."""
    broken = RULES_TEST.read_text().replace("image: /a}", "image: /b}", 1)
    assert broken != RULES_TEST.read_text()
    copy = tmp_path / "rules_test.yml"
    copy.write_text(broken.replace("../../charts", str(RULES.parents[3] / "charts")))
    proc = promtool("test", "rules", str(copy))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.count("FAILED") == 1 and "alertname: SifoverlayOverlayDrift, time: 35m" in out, out


def _identifiers(expr: str) -> set[str]:
    import re

    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
