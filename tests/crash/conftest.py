"""Crash-harness totals line printed at the end of the run (tests/crash/harness.py)."""

from __future__ import annotations

from typing import Any

from tests.crash import harness


def pytest_terminal_summary(terminalreporter: Any) -> None:
    line = harness.totals_line()
    if line:
        terminalreporter.write_line(line)
