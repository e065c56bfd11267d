"""Fixtures of the sif tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def copy_vector(vectors: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Copy a vector (path relative to the vectors dir) into tmp_path, writable."""

    def _copy(relative: str, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(relative).name)
        shutil.copyfile(vectors / relative, dst)
        dst.chmod(0o644)
        return dst

    return _copy


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    from .support import FUZZ_COUNTS

    if FUZZ_COUNTS["sif"]:
        terminalreporter.write_line(
            "sif fuzz: {sif} cases opened with SifFile ({sif_accepted} accepted), "
            "{ocisif} passed on to ocisif.open_image ({ocisif_accepted} accepted)".format(**FUZZ_COUNTS)
        )
