"""Session-wide test helpers shared by every area. Area fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO.parent / "shared" / "vectors"
IN_CI = bool(os.environ.get("CI"))


def require_tool(*names: str) -> None:
    """Skip (locally) or fail (in CI) when an external tool is missing."""
    missing = [n for n in names if shutil.which(n) is None and not os.path.exists(n)]
    if missing:
        msg = f"missing tool(s): {', '.join(missing)}"
        if IN_CI:
            pytest.fail(msg + " (CI must install it: scripts/setup.sh)")
        pytest.skip(msg)


def require_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root (CI runs as root)")
        pytest.skip("needs root")


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS}")
    return VECTORS


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def siftool() -> str:
    """Path to the Go reference siftool (sylabs/sif from Debian), built once into
    .tools/siftool by scripts/build-siftool.sh. Skips locally / fails in CI without Go."""
    import subprocess

    path = REPO / ".tools" / "siftool"
    if not path.exists():
        require_tool("go")
        proc = subprocess.run(
            [str(REPO / "scripts" / "build-siftool.sh"), str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            msg = f"cannot build siftool: {tail}"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
    require_tool(str(path))
    return str(path)
