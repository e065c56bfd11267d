"""mypy --strict over the core layers (format, image model, ext3, upper, engine).

The configuration lives in pyproject.toml [tool.mypy]; these tests run mypy from the same
interpreter as pytest, so the checked code is the installed (editable) package.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# What the style guide asks to be strict ("mypy strict on sif, ocisif, engine"), plus
# the modules beside them in the same layers.
STRICT_PACKAGES = ("sifoverlay.sif", "sifoverlay.ocisif", "sifoverlay.ext3", "sifoverlay.engine")
STRICT_MODULES = ("sifoverlay.errors", "sifoverlay.fsio", "sifoverlay.upper")


def _require_mypy() -> None:
    """Like conftest.require_tool, for a Python module (a skip the session check refuses)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'oci-sif-overlay[test]')")


def _mypy(cache: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(cache), "--no-color-output", *targets],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _source_count() -> int:
    """How many files mypy must report as checked: every module of the strict packages."""
    packages = sum(1 for p in STRICT_PACKAGES for _ in (REPO / p.replace(".", "/")).rglob("*.py"))
    return packages + len(STRICT_MODULES)


def test_core_layers_are_strictly_typed(tmp_path: Path) -> None:
    _require_mypy()
    targets = [arg for p in STRICT_PACKAGES for arg in ("-p", p)]
    targets += [arg for m in STRICT_MODULES for arg in ("-m", m)]
    proc = _mypy(tmp_path / "cache", *targets)
    if proc.returncode != 0:
        pytest.fail(f"mypy --strict found errors (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    # All of them were really checked, none silently skipped.
    assert proc.stdout.strip().splitlines()[-1] == f"Success: no issues found in {_source_count()} source files"


def test_config_is_strict_for_core_modules(tmp_path: Path) -> None:
    """The configuration really is strict: an unannotated function and an implicit
    re-export, both legal in non-strict mode, are reported."""
    _require_mypy()
    probe = tmp_path / "typing_probe.py"
    probe.write_text("from os import path\n\n\ndef untyped(x):\n    return x\n")
    user = tmp_path / "typing_probe_user.py"
    user.write_text("from typing_probe import path\n\nprint(path.sep)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), "--no-color-output", str(probe), str(user)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "typing_probe.py:4: error: Function is missing a type annotation  [no-untyped-def]" in proc.stdout
    assert 'Module "typing_probe" does not explicitly export attribute "path"  [attr-defined]' in proc.stdout
