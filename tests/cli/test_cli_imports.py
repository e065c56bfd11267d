"""Issue 17 (fast CLI): `sifoverlay --help`, `overlay status` and a no-op `overlay sync`
import only what they use. Each case runs the CLI in a fresh interpreter and reads back
sys.modules; no timing here (bench/cli_start.py measures the start-up cost)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, engine_base_source, require_tool

# The integrations and the heavy third-party modules none of these commands needs.
FORBIDDEN = (
    "sifoverlay.slurm", "sifoverlay.k8s", "sifoverlay.metrics", "sifoverlay.registry", "sifoverlay.runtime",
    "kopf", "kubernetes", "prometheus_client", "oras", "requests", "urllib3", "yaml",
)
# Engine and format modules a no-op sync or a status does not need (writers, fsck, loop tools).
NOT_FOR_READING = (
    "sifoverlay.engine.commit", "sifoverlay.engine.create", "sifoverlay.engine.seal", "sifoverlay.engine.recover",
    "sifoverlay.ext3.fsck", "sifoverlay.ext3.mkfs", "sifoverlay.ext3.tools", "sifoverlay.sif.add",
    "sifoverlay.sif.writeout", "sifoverlay.sif.create", "subprocess", "shutil", "tempfile", "uuid", "platform",
)
# A status asks who holds the lease (quiesce); the no-op sync only reads the fingerprint.
NOT_FOR_NOOP_SYNC = ("sifoverlay.engine.lease", "sifoverlay.engine.quiesce", "secrets", "socket")

PROBE = """
import contextlib, io, json, sys
from sifoverlay.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
sys.__stdout__.write(json.dumps({"code": code, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def loaded_by(*argv: str) -> tuple[int, str, set[str]]:
    """(exit code, stdout, sys.modules) of `sifoverlay ARGV` run in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    return data["code"], data["out"], set(data["modules"])


def offending(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.fixture
def clean_image(tmp_path: Path) -> tuple[Path, Path]:
    require_tool("mkfs.ext3")
    from sifoverlay import engine

    image = tmp_path / "image.sif"
    shutil.copyfile(engine_base_source(), image)
    journal = tmp_path / "journal"
    engine.create_overlay(image, size_mib=64, sparse=True, journal_dir=journal)
    assert engine.sync(image, journal_dir=journal).action in ("noop", "reconciled")
    return image, journal


def test_help_imports_no_command_and_no_integration() -> None:
    code, out, modules = loaded_by("--help")
    assert code == 0
    for verb in ("inspect", "import", "overlay", "recover", "exec", "exporter", "push", "pull"):
        assert f"\n    {verb} " in out, f"{verb} missing from --help:\n{out}"
    assert offending(modules, FORBIDDEN) == []
    assert offending(modules, ("sifoverlay.engine", "sifoverlay.ocisif", "sifoverlay.sif", "sifoverlay.ext3",
                               "shutil", "zlib", "lzma")) == []


def test_verb_help_builds_only_that_verb() -> None:
    code, out, modules = loaded_by("overlay", "sync", "--help")
    assert code == 0 and "--force-hash" in out
    assert offending(modules, FORBIDDEN) == []
    assert "sifoverlay.cli.cmd_overlay" in modules
    assert offending(modules, ("sifoverlay.cli.cmd_exec", "sifoverlay.cli.cmd_inspect", "sifoverlay.cli.cmd_push",
                               "sifoverlay.cli.cmd_exporter", "sifoverlay.engine")) == []


def test_status_and_noop_sync_import_no_integration(clean_image: tuple[Path, Path]) -> None:
    image, journal = clean_image
    code, out, status_modules = loaded_by("overlay", "status", "--journal-dir", str(journal), str(image))
    assert code == 0 and out.startswith(f"{image}: clean\n"), out
    code, out, sync_modules = loaded_by("overlay", "sync", "--journal-dir", str(journal), str(image))
    assert code == 0 and out.startswith(f"{image}: noop (sha256:"), out
    for modules in (status_modules, sync_modules):
        assert offending(modules, FORBIDDEN) == []
        assert offending(modules, NOT_FOR_READING) == []
    assert offending(sync_modules, NOT_FOR_NOOP_SYNC) == []
    code, out, json_modules = loaded_by("overlay", "sync", "--json", "--journal-dir", str(journal), str(image))
    assert code == 0 and json.loads(out)["action"] == "noop"
    assert offending(json_modules, FORBIDDEN) == []


def test_sync_with_a_textfile_dir_still_counts_it(clean_image: tuple[Path, Path], tmp_path: Path) -> None:
    """The metrics package stays out only when no textfile directory is asked for."""
    pytest.importorskip("prometheus_client", reason="the textfile needs prometheus-client")
    image, journal = clean_image
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    code, _, modules = loaded_by("overlay", "sync", "--textfile-dir", str(textfile), "--journal-dir", str(journal),
                                 str(image))
    assert code == 0
    assert "sifoverlay.metrics.record" in modules
    assert "sifoverlay_" in (textfile / "sifoverlay_events.prom").read_text()


def test_textfile_env_name_is_the_metrics_one() -> None:
    from sifoverlay.cli import cmd_overlay
    from sifoverlay.metrics import record

    assert cmd_overlay.TEXTFILE_ENV == record.ENV_TEXTFILE_DIR


def test_lazy_packages_keep_their_names() -> None:
    """engine, sif and ext3 load their names on first use: every name of __all__ resolves,
    and `engine.status` / `recover` / `seal` stay the functions even when the submodule of
    the same name is imported first."""
    probe = """
import sys, types
import sifoverlay.engine.status, sifoverlay.engine.recover, sifoverlay.engine.seal
from sifoverlay import engine, ext3, sif
assert callable(engine.status) and not isinstance(engine.status, types.ModuleType), engine.status
assert engine.status is sys.modules["sifoverlay.engine.status"].status
assert engine.recover is sys.modules["sifoverlay.engine.recover"].recover
assert engine.seal is sys.modules["sifoverlay.engine.seal"].seal
for package in (engine, ext3, sif):
    for name in package.__all__:
        assert getattr(package, name) is not None, name
assert engine.lease is sys.modules["sifoverlay.engine.lease"]
assert sif.header is sys.modules["sifoverlay.sif.header"] and ext3.fsck is sys.modules["sifoverlay.ext3.fsck"]
for package in (engine, ext3, sif):
    try:
        package.no_such_name
    except AttributeError:
        pass
    else:
        raise AssertionError(package)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


# What the no-op sync answered from the memo (engine/noopmemo.py) must not load: the engine's
# reconcile path, every parser, and the stdlib modules only they use (json: the probe itself loads it).
NOT_FOR_MEMO_NOOP = (
    "sifoverlay.engine.reconcile", "sifoverlay.engine.journal", "sifoverlay.engine.status", "sifoverlay.ocisif",
    "sifoverlay.sif", "sifoverlay.ext3", "sifoverlay.metrics", "logging", "dataclasses", "hashlib",
    "inspect",
)


@pytest.fixture
def remembered_image(clean_image: tuple[Path, Path], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, str]:
    """clean_image with the memo a CLI no-op sync leaves (QUIET_NS 0: just written)."""
    from sifoverlay import engine
    from sifoverlay.engine import noopmemo

    image, journal = clean_image
    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))  # inherited by loaded_by's interpreter
    monkeypatch.setattr(noopmemo, "QUIET_NS", 0)
    result = engine.sync(image, journal_dir=journal, remember_noop=True)
    assert result.action == "noop"
    return image, journal, result.new_digest


def test_noop_sync_from_the_memo_loads_no_parser(remembered_image: tuple[Path, Path, str]) -> None:
    image, journal, digest = remembered_image
    code, out, modules = loaded_by("overlay", "sync", "--journal-dir", str(journal), str(image))
    assert (code, out) == (0, f"{image}: noop ({digest})\n")
    assert offending(modules, NOT_FOR_MEMO_NOOP) == [] and offending(modules, FORBIDDEN) == []
    assert "sifoverlay.engine.noopmemo" in modules


def test_memo_json_is_the_engines(remembered_image: tuple[Path, Path, str]) -> None:
    """--json from the memo: the keys and values of the engine's no-op (but the seconds)."""
    from sifoverlay import engine

    image, journal, _ = remembered_image
    code, out, modules = loaded_by("overlay", "sync", "--json", "--journal-dir", str(journal), str(image))
    assert code == 0 and "sifoverlay.engine.reconcile" not in modules
    fast = json.loads(out)
    full = engine.sync(image, journal_dir=journal).as_dict()
    assert list(fast) == list(full)
    assert {k: v for k, v in fast.items() if k != "seconds"} == {k: v for k, v in full.items() if k != "seconds"}


def test_force_hash_and_a_changed_image_take_the_full_path(remembered_image: tuple[Path, Path, str]) -> None:
    image, journal, digest = remembered_image
    code, out, modules = loaded_by("overlay", "sync", "--force-hash", "--journal-dir", str(journal), str(image))
    assert (code, out) == (0, f"{image}: noop ({digest})\n")
    assert "sifoverlay.engine.reconcile" in modules and "logging" in modules
    os.chmod(image, 0o640)  # any change of the inode (here only its ctime): the memo no longer applies
    code, out, modules = loaded_by("overlay", "sync", "--journal-dir", str(journal), str(image))
    assert (code, out) == (0, f"{image}: noop ({digest})\n")
    assert "sifoverlay.engine.reconcile" in modules
