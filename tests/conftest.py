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
