"""The CLI never leaks: every error is one line, obeys --json, uses the documented exit
codes (2 bad input, 75 busy, 77 not authorized, 1 failure), names a path the user typed
(never an internal scratch file), and crafted OCI JSON never produces a traceback."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from sifoverlay.cli import cmd_inspect, main
from sifoverlay.cli.cmd_overlay import parse_size
from sifoverlay.ocisif import jsonedit, mediatypes
from sifoverlay.ocisif.build import write_ocisif
from sifoverlay.sif.add import add_object
from sifoverlay.sif.constants import DataType, FsType, PartType, arch_code
from sifoverlay.sif.create import write_new
from sifoverlay.sif.delete import delete_objects
from sifoverlay.sif.load import SifFile
from sifoverlay.sif.descriptor import partition_extra
from sifoverlay.sif.writeout import ObjectInput

from tests.conftest import REPO, require_root, require_tool
from tests.importer.reftree import entry, make_tar, write_layout

CLI = REPO / ".venv" / "bin" / "sifoverlay"
NOBODY = 65534


def run_cli(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *argv], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def one_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(one_line(result))
    return data


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    state = tmp_path / "state"
    return {"SIFOVERLAY_JOURNAL_DIR": str(state / "journal"), "SIFOVERLAY_STATE_DIR": str(state)}


# -- crafted OCI JSON ---------------------------------------------------------------------------------
def crafted(out: Path, *, config: bytes | None = None, layer_media_type: str = mediatypes.SQUASHFS_LAYER,
            layer_size: Any = None, root_extra: bytes = b"", manifest_patch: tuple[bytes, bytes] | None = None) -> Path:
    """A one-image OCI-SIF whose config / layer descriptor / root index carry crafted values."""
    layer = b"squashfs-ish layer bytes"
    config_raw = config if config is not None else b'{"architecture":"amd64","os":"linux"}'
    layer_desc: dict[str, Any] = {"mediaType": layer_media_type, "size": len(layer), "digest": jsonedit.digest_of(layer)}
    manifest_raw = jsonedit.canonical({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                                       "config": jsonedit.descriptor_of(config_raw, mediatypes.OCI_CONFIG),
                                       "layers": [layer_desc]})
    if layer_size is not None:  # spliced in as text: the value may be no Python int at all
        manifest_raw = manifest_raw.replace(b'"size":%d,"digest":"%s"' % (len(layer), layer_desc["digest"].encode()),
                                            b'"size":%s,"digest":"%s"' % (layer_size, layer_desc["digest"].encode()))
    if manifest_patch is not None:
        manifest_raw = manifest_raw.replace(*manifest_patch)
    entry_raw = jsonedit.canonical(jsonedit.descriptor_of(manifest_raw, mediatypes.OCI_MANIFEST))
    root = b'{"schemaVersion":2,"mediaType":"%s","manifests":[%s]' % (mediatypes.OCI_INDEX.encode(), entry_raw)
    write_ocisif(out, [layer, config_raw, manifest_raw], root + b"}")
    if root_extra:  # written as the Go library would: it does not parse what it stores
        with SifFile.open(out) as sif:
            root_id = next(d.id for d in sif.used() if d.datatype == DataType.OCI_ROOT_INDEX)
        delete_objects(out, [root_id], zero=True, compact=True)
        add_object(out, ObjectInput(DataType.OCI_ROOT_INDEX, root + root_extra + b"}"))
    return out


HUGE_INT = b"9" * 5000
CRAFTED = {
    # name: (builder kwargs, reason pattern shown by inspect and by the overlay verbs)
    "config-huge-int": ({"config": b'{"architecture":"amd64","os":"linux","x":' + HUGE_INT + b"}"},
                        "an integer of 5000 digits"),
    "config-huge-negative-int": ({"config": b'{"os":"linux","x":[-' + HUGE_INT + b"]}"}, "an integer of 5000 digits"),
    "config-huge-float": ({"config": b'{"os":"linux","x":1e999}'}, "out of range"),
    "config-long-float": ({"config": b'{"os":"linux","x":0.' + HUGE_INT + b"}"}, "a number of 5002 characters"),
    "config-nested-200": ({"config": b'{"x":' + b"[" * 200 + b"]" * 200 + b"}"}, "nested deeper than 128 levels"),
    "config-nested-100000": ({"config": b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}"}, "nested deeper than 128 levels"),
    "layer-size-huge": ({"layer_size": HUGE_INT}, "an integer of 5000 digits"),
    "layer-size-over-int64": ({"layer_size": b"9223372036854775808"}, "has no valid size"),
    "root-index-huge-int": ({"root_extra": b',"annotations":{"n":' + HUGE_INT + b"}"}, "an integer of 5000 digits"),
    "root-index-nested": ({"root_extra": b',"x":' + b"[" * 5000 + b"]" * 5000}, "nested deeper than 128 levels"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_json_is_one_line_never_a_traceback(case: str, tmp_path: Path, env: dict[str, str]) -> None:
    kwargs, reason = CRAFTED[case]
    path = crafted(tmp_path / "crafted.oci.sif", **kwargs)
    shown = run_cli("inspect", "--json", str(path))
    assert (shown.returncode, shown.stderr) == (0, "")
    report = json.loads(shown.stdout)
    reasons = report["warnings"] + [i["error"] for i in report["images"] if i["error"]]
    assert [r for r in reasons if reason in r], reasons
    text = run_cli("inspect", str(path))
    assert (text.returncode, text.stderr) == (0, "") and reason in text.stdout
    for verb in (["overlay", "status"], ["overlay", "sync"], ["overlay", "create", "--sparse"]):
        plain = run_cli(*verb, str(path), env=env)
        assert plain.returncode == 2
        line = one_line(plain)
        assert line.startswith(f"sifoverlay: {path}: ") and reason in line and len(line) < 1000
        error = one_json(run_cli(*verb, "--json", str(path), env=env))
        assert error["error"] == "OciFormatError" and error["path"] == str(path) and reason in error["message"]


def test_huge_strings_are_shown_cut_in_text_and_whole_in_json(tmp_path: Path) -> None:
    media_type = "application/vnd.example." + "x" * (2 << 20)
    path = crafted(tmp_path / "long.oci.sif", layer_media_type=media_type)
    report = json.loads(run_cli("inspect", "--json", str(path)).stdout)
    assert report["oci"]["layers"][0]["mediaType"] == media_type
    text = run_cli("inspect", str(path))
    assert text.returncode == 0 and max(len(line) for line in text.stdout.splitlines()) < 1000


# -- errors name what the user typed; --json; exit codes ----------------------------------------------
def layout_image(tmp_path: Path, env: dict[str, str]) -> Path:
    """A small OCI-SIF imported from a pure-Python OCI layout (no overlay yet)."""
    tar = make_tar([(entry("etc", "dir", mode=0o755), None), (entry("etc/hello"), b"hello\n")])
    layout = write_layout(tmp_path / "layout", [{"layers": [(mediatypes.OCI_LAYER_TAR, tar)]}])
    out = tmp_path / "img" / "image.oci.sif"
    out.parent.mkdir()
    result = run_cli("import", str(layout), str(out), env=env)
    assert result.returncode == 0, result.stderr
    return out


def test_size_forms_of_singularity() -> None:
    assert [parse_size(t) for t in ("64", "64M", "64m", "64MiB", "64MB", "1G", "1g", "1GiB", "1.5G", "2T", "65536K")] == [
        64, 64, 64, 64, 64, 1024, 1024, 1024, 1536, 2 << 20, 64]
    for bad in ("", "x", "64X", "-1", "1e3", "100K", "0.1M"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_create_size_is_checked_before_anything_is_staged(tmp_path: Path, env: dict[str, str]) -> None:
    require_tool("mkfs.ext3", "tar2sqfs")
    image = layout_image(tmp_path, env)
    before = sorted(p.name for p in image.parent.iterdir())
    line = one_line(run_cli("overlay", "create", "--size", "32", str(image), env=env))
    assert line == f"sifoverlay: {image}: overlay size must be at least 64 MiB, got 32 MiB"
    error = one_json(run_cli("overlay", "create", "--json", "--size", "32M", str(image), env=env))
    assert (error["error"], error["path"]) == ("UsageError", str(image))
    bad_unit = one_json(run_cli("overlay", "create", "--json", "--size", "1Q", str(image), env=env))
    assert bad_unit["error"] == "UsageError" and "--size" in bad_unit["message"]
    too_big = one_json(run_cli("overlay", "create", "--json", "--size", "17T", str(image), env=env))
    assert too_big["message"] == f"{image}: overlay size 17825792 MiB is over ext3's limit of 16777216 MiB (16 TiB)"
    no_room = one_json(run_cli("overlay", "create", "--json", "--size", "16T", str(image), env=env))
    assert no_room["error"] == "UsageError" and no_room["path"] == str(image)
    assert "MiB overlay needs" in no_room["message"] and "use --sparse" in no_room["message"]
    assert sorted(p.name for p in image.parent.iterdir()) == before
    assert not list(Path(env["SIFOVERLAY_STATE_DIR"]).rglob("*.ext3"))
    made = run_cli("overlay", "create", "--json", "--sparse", "--size", "1G", str(image), env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["layer_size"] == 1 << 30


@pytest.fixture()
def open_dir() -> Any:
    """A directory that every user may traverse (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sifoverlay-cli-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_unprivileged_sync_of_an_image_it_cannot_write_is_json_exit_77(open_dir: Path) -> None:
    """A real unprivileged process (setpriv to nobody, the system Python, the package
    copied where nobody can read it): the image is root's 0644 file."""
    require_root()
    require_tool("setpriv", "mkfs.ext3", "tar2sqfs")
    tmp_path = open_dir
    root_env = {"SIFOVERLAY_STATE_DIR": str(tmp_path / "root-state")}
    image = layout_image(tmp_path, root_env)
    assert run_cli("overlay", "create", "--sparse", str(image), env=root_env).returncode == 0
    os.chmod(image, 0o644)
    os.chmod(image.parent, 0o755)
    package = tmp_path / "pkg"
    shutil.copytree(REPO / "sifoverlay", package / "sifoverlay", ignore=shutil.ignore_patterns("__pycache__"))
    user_state = tmp_path / "nobody-state"
    user_state.mkdir(mode=0o777)
    os.chmod(user_state, 0o777)
    for path in [package, *package.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    before = image.read_bytes()

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-m", "sifoverlay",
             *argv],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(package), "HOME": "/nonexistent",
                 "SIFOVERLAY_STATE_DIR": str(user_state), "SIFOVERLAY_JOURNAL_DIR": str(user_state / "journal")},
        )

    status = as_nobody("overlay", "status", "--json", str(image))  # reading is allowed
    assert status.returncode == 0, status.stderr
    for argv in (["overlay", "sync", "--json", "--force-hash", str(image)], ["overlay", "seal", "--json", str(image)]):
        result = as_nobody(*argv)
        assert result.returncode == 77, result.stderr
        error = one_json(result)
        assert (error["error"], error["path"], error["errno"]) == ("NotAuthorized", str(image), errno.EACCES)
        assert "Permission denied" in error["message"]
    plain = as_nobody("overlay", "sync", "--force-hash", str(image))
    assert plain.returncode == 77
    assert one_line(plain).startswith(f"sifoverlay: {image}: Permission denied")
    assert image.read_bytes() == before
    assert stat.S_IMODE(image.stat().st_mode) == 0o644


def test_os_errors_on_internal_files_name_the_typed_path(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    image = str(tmp_path / "img.sif")
    cases = [
        (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".img.sif.sifoverlay-tmp-h-1.ext3")), 77,
         "NotAuthorized", f"{image}: Permission denied (working file in {tmp_path})"),
        (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".sifoverlay-import-abc" / "0.tar")), 1,
         "IOFailure", f"{image}: No space left on device (working file in {tmp_path})"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", image), 2, "FileProblem",
         f"{image}: No such file or directory"),
        (PermissionError(errno.EACCES, "Permission denied", "/proc/self/fd/3"), 77, "NotAuthorized",
         f"{image}: Permission denied"),
    ]
    for exc, code, name, message in cases:
        def boom(path: str, exc: OSError = exc) -> dict[str, Any]:
            raise exc
        monkeypatch.setattr(cmd_inspect, "inspect_file", boom)
        assert main(["inspect", image]) == code
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"sifoverlay: {message}\n")
        assert main(["inspect", "--json", image]) == code
        error = json.loads(capsys.readouterr().err)
        assert (error["error"], error["path"], error["message"]) == (name, image, message)


def test_a_bug_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def boom(path: str) -> dict[str, Any]:
        raise RuntimeError("something\nunexpected")
    monkeypatch.setattr(cmd_inspect, "inspect_file", boom)
    assert main(["inspect", "/x/img.sif"]) == 1
    err = capsys.readouterr().err
    assert err == ("sifoverlay: /x/img.sif: internal error: RuntimeError: something unexpected "
                   "(run with -v for the traceback)\n")
    assert main(["inspect", "--json", "/x/img.sif"]) == 1
    assert json.loads(capsys.readouterr().err)["error"] == "SifOverlayError"


def test_usage_errors_obey_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["overlay", "sync", "--json", "--no-such-flag", "img.sif"])
    assert exited.value.code == 2
    assert json.loads(capsys.readouterr().err) == {"error": "UsageError", "path": None,
                                                   "message": "unrecognized arguments: --no-such-flag"}
    with pytest.raises(SystemExit):
        main(["overlay", "sync", "--no-such-flag", "img.sif"])
    assert capsys.readouterr().err == "sifoverlay: error: unrecognized arguments: --no-such-flag\n"


def test_native_sif_gets_the_import_hint(tmp_path: Path, env: dict[str, str]) -> None:
    native = tmp_path / "native.sif"
    write_new(native, [ObjectInput(DataType.PARTITION, bytes(8192),
                                   extra=partition_extra(FsType.SQUASH, PartType.PRIMSYS, arch_code("amd64")))])
    hint = f"convert it with `sifoverlay import {native} OUT.oci.sif`"
    for verb in (["overlay", "status"], ["overlay", "sync"], ["overlay", "create"], ["overlay", "seal"]):
        result = run_cli(*verb, str(native), env=env)
        assert result.returncode == 2
        line = one_line(result)
        assert line.startswith(f"sifoverlay: {native}: ") and hint in line, line
    report = json.loads(run_cli("inspect", "--json", str(native)).stdout)
    assert report["hint"] == f"not an OCI-SIF; a native SIF: {hint}"


@pytest.mark.parametrize("raw", [b'{"n":' + HUGE_INT + b"}", b"[" * 100000 + b"]" * 100000, b'{"n":1e999}'])
def test_registry_manifests_with_crafted_values_are_a_registry_error(raw: bytes) -> None:
    from sifoverlay.errors import RegistryError
    from sifoverlay.registry import docker_pull

    class Client:
        def fail(self, problem: str) -> RegistryError:
            return RegistryError("docker://host/repo:tag", problem)

    with pytest.raises(RegistryError, match="the registry sent a manifest that is not JSON"):
        docker_pull._json(raw, Client())  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [b'{"rootfs":{"diff_ids":"x"}}', b'{"rootfs":"x"}', b'{"history":"x"}'])
def test_config_of_the_wrong_shape_is_bad_input(config: bytes, tmp_path: Path, env: dict[str, str]) -> None:
    path = crafted(tmp_path / "shape.oci.sif", config=config)
    error = one_json(run_cli("overlay", "create", "--json", "--sparse", str(path), env=env))
    assert (error["error"], error["path"]) == ("OciFormatError", str(path))
    assert "config" in error["message"] and "internal error" not in error["message"]


def test_internal_names_inside_the_message_are_scrubbed(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from sifoverlay.engine import statedir
    from sifoverlay.errors import ExternalToolError

    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))
    scratch = os.path.join(statedir.scratch_dir(), "host-1.abcd.ext3")
    hidden = str(tmp_path / ".img.sif.sifoverlay-tmp-host-1.ext3")

    def boom(path: str) -> dict[str, Any]:
        raise ExternalToolError(path, f"mkfs.ext3 failed: {scratch}: No space left; then '{hidden}': EIO",
                                tool="mkfs.ext3", returncode=1, output_tail="")
    monkeypatch.setattr(cmd_inspect, "inspect_file", boom)
    image = str(tmp_path / "img.sif")
    assert main(["inspect", image]) == 1
    assert capsys.readouterr().err == (
        f"sifoverlay: {image}: mkfs.ext3 failed: a working file in {statedir.scratch_dir()}: No space left; "
        f"then 'a working file in {tmp_path}': EIO\n")


def test_closed_stdout_is_one_line() -> None:
    result = subprocess.run(f"exec >&-; {CLI} inspect --json /nonexistent.sif", shell=True, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert json.loads(result.stderr)["message"] == "cannot write the output: standard output is closed"


def test_library_create_checks_the_size_before_staging(tmp_path: Path, env: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sifoverlay.engine.create import create_overlay
    from sifoverlay.errors import UsageError

    image = crafted(tmp_path / "img.oci.sif")
    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", env["SIFOVERLAY_STATE_DIR"])
    for size in (32, 0, True, 64.5):
        with pytest.raises(UsageError) as raised:
            create_overlay(image, size_mib=size, journal_dir=env["SIFOVERLAY_JOURNAL_DIR"])  # type: ignore[arg-type]
        assert str(raised.value) == f"{image}: overlay size must be at least 64 MiB, got {size!r}"
    assert not Path(env["SIFOVERLAY_STATE_DIR"]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.oci.sif"]


def test_text_output_never_fails_to_encode(tmp_path: Path, env: dict[str, str]) -> None:
    """A strict UTF-8 stdout (a real en_US.UTF-8 locale): a file name that is not UTF-8
    comes out as its bytes; a lone surrogate of a crafted media type as an escape."""
    path = crafted(tmp_path / "x.oci.sif")
    raw = path.read_bytes()
    odd_name = os.fsencode(tmp_path) + b"/\xff.sif"
    with open(odd_name, "wb") as handle:
        handle.write(raw)
    strict = {**env, "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run([os.fsencode(CLI), b"inspect", odd_name], capture_output=True, timeout=60,
                            env={**os.environ, **strict})
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b"Image:        " + odd_name + b"\n")
    status = subprocess.run([os.fsencode(CLI), b"overlay", b"status", odd_name], capture_output=True, timeout=60,
                            env={**os.environ, **strict})
    assert status.returncode == 2 and b"Traceback" not in status.stderr and status.stderr.count(b"\n") == 1
    lone = crafted(tmp_path / "lone.oci.sif", layer_media_type="application/vnd.example.MARK",
                   manifest_patch=(b"MARK", b"\\ud800"))
    shown = subprocess.run([str(CLI), "inspect", str(lone)], capture_output=True, timeout=60, env={**os.environ, **strict})
    assert (shown.returncode, shown.stderr) == (0, b"")
    assert b"application/vnd.example.\\ud800" in shown.stdout
    tar = make_tar([(entry("hello"), b"hello\n")])
    layout = write_layout(tmp_path / "layout", [{"layers": [(mediatypes.OCI_LAYER_TAR, tar)]}])
    out_name = os.fsencode(tmp_path) + b"/\xfe.oci.sif"
    imported = subprocess.run([os.fsencode(CLI), b"import", os.fsencode(layout), out_name], capture_output=True,
                              timeout=120, env={**os.environ, **strict})
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(out_name + b": 1 squashfs layer(s)")
