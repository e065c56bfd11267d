"""Crash-harness fixtures and the totals line printed at the end of the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crash import harness


def pytest_terminal_summary(terminalreporter: Any) -> None:
    totals = harness.TOTALS
    if totals["points"] or totals["nested"]:
        terminalreporter.write_line(
            f"crash points tested: {totals['points']}, recovered to old-or-new: {totals['old_or_new']}"
            f" (plus nested recovery crash points: {totals['nested']}, recovered: {totals['nested_ok']})"
        )


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Work tree on tmpfs when there is one: the harness simulates crashes itself, so real
    fsyncs only cost time (hundreds of runs per scenario)."""
    base = Path(tempfile.mkdtemp(prefix="sifoverlay-crash-", dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path
    work = base / "work"
    (work / "img").mkdir(parents=True)
    (work / "journal").mkdir()
    try:
        yield work
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)
