"""Fixtures for the lease tests: a sparse stand-in image and child processes that hold
leases or POSIX locks (always reaped)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("child.py")
REGION = (4096, 1 << 20)


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Lease records live in the state directory (engine/statedir.py): a private one per test."""
    path = tmp_path / "state"
    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(path))
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.oci.sif"
    with open(path, "wb") as fh:
        fh.truncate(8 << 20)
    return path


class Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), *map(str, args)], stdout=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def line(self, proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.cleanup()
