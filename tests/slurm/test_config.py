"""sifoverlay.slurm.config: the Python side reads the same plugstack line as the C plugin,
with the same strictness; and jobenv's parsing of SPANK_OCI_SIF_OVERLAY. No cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.slurm.config import SlurmConfig, find_plugstack, load_config, parse_args
from sifoverlay.slurm.jobenv import JobEnv, parse_request


def test_all_keys() -> None:
    config = parse_args(["journal_dir=/j", "runtime_dir=/r", "image_roots=/a:/b/c", "default_mode=ro",
                         "sifoverlay=/opt/py/bin/python", "mount=kernel"], source="x")
    assert config == SlurmConfig(journal_dir="/j", runtime_dir="/r", image_roots=("/a", "/b/c"),
                                 default_mode="ro", sifoverlay="/opt/py/bin/python", mount="kernel", source="x")
    assert config.records_dir == "/r/slurm"
    assert config.mounts_dir == "/r/mounts"


def test_epilog_reconcile_is_async_unless_the_admin_says_sync() -> None:
    assert parse_args([]).epilog_reconcile == "async"
    assert parse_args(["epilog_reconcile=sync"]).epilog_reconcile == "sync"
    assert parse_args(["epilog_reconcile=async"]).epilog_reconcile == "async"


def test_prolog_mounts_are_detached_unless_the_admin_says_inline() -> None:
    assert parse_args([]).prolog_mounts == "detached"
    assert parse_args(["prolog_mounts=inline"]).prolog_mounts == "inline"
    assert parse_args(["prolog_mounts=detached"]).prolog_mounts == "detached"


def test_defaults() -> None:
    config = parse_args([])
    assert (config.journal_dir, config.runtime_dir, config.image_roots, config.default_mode, config.mount) == (
        "/var/lib/sifoverlay/journal", "/run/sifoverlay", (), "rw", "fuse")


@pytest.mark.parametrize("arg,message", [
    ("colour=blue", "plugstack: unknown key 'colour'"),
    ("verbose", "plugstack: argument 'verbose' is not key=value"),
    ("journal_dir=", "plugstack: journal_dir: empty value"),
    ("journal_dir=var/j", "plugstack: journal_dir=var/j: not an absolute path"),
    ("runtime_dir=/run/../etc", "plugstack: runtime_dir=/run/../etc: '..' is not allowed"),
    ("image_roots=/ok:rel", "plugstack: image_roots=rel: not an absolute path"),
    ("image_roots=::", "plugstack: image_roots: empty list"),
    ("default_mode=rx", "plugstack: default_mode=rx: expected rw or ro"),
    ("mount=nfs", "plugstack: mount=nfs: expected fuse or kernel"),
    ("epilog_reconcile=later", "plugstack: epilog_reconcile=later: expected async or sync"),
    ("prolog_mounts=later", "plugstack: prolog_mounts=later: expected detached or inline"),
])
def test_strict_keys(arg: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_args([arg], source="/etc/slurm/plugstack.conf:3")
    assert str(info.value) == f"/etc/slurm/plugstack.conf:3: {message}"


def test_load_follows_includes(tmp_path: Path) -> None:
    (tmp_path / "plugstack.conf.d").mkdir()
    (tmp_path / "plugstack.conf").write_text("# comment\noptional /usr/lib/other.so x=1\n"
                                             "include plugstack.conf.d/*.conf\n")
    (tmp_path / "plugstack.conf.d" / "a.conf").write_text("\n")
    (tmp_path / "plugstack.conf.d" / "sifoverlay.conf").write_text(
        "required /usr/lib/sifoverlay/sifoverlay_spank.so journal_dir=/jj image_roots=/imgs  # note\n")
    config = load_config(env={"SLURM_CONF": str(tmp_path / "slurm.conf")})
    assert config.journal_dir == "/jj"
    assert config.image_roots == ("/imgs",)
    assert config.source == f"{tmp_path}/plugstack.conf.d/sifoverlay.conf:1"


def test_load_without_plugin_line_gives_defaults(tmp_path: Path) -> None:
    (tmp_path / "plugstack.conf").write_text("optional /usr/lib/other.so\n")
    config = load_config(str(tmp_path / "plugstack.conf"))
    assert config == SlurmConfig(source=str(tmp_path / "plugstack.conf"))


def test_load_refuses_bad_key_naming_line(tmp_path: Path) -> None:
    (tmp_path / "p.conf").write_text("\nrequired /x/sifoverlay_spank.so bogus=1\n")
    with pytest.raises(UsageError, match=r"p\.conf:2: plugstack: unknown key 'bogus'$"):
        load_config(str(tmp_path / "p.conf"))


def test_find_plugstack_order() -> None:
    assert find_plugstack({"SIFOVERLAY_PLUGSTACK": "/x/p.conf", "SLURM_CONF": "/e/slurm.conf"}) == "/x/p.conf"
    assert find_plugstack({"SLURM_CONF": "/e/slurm.conf"}) == "/e/plugstack.conf"
    assert find_plugstack({}) == "/etc/slurm/plugstack.conf"


@pytest.mark.parametrize("value,expected", [
    ("/a/img.sif", ("/a/img.sif", "rw")),
    ("/a/img.sif:ro", ("/a/img.sif", "ro")),
    ("/a/img.sif:rw", ("/a/img.sif", "rw")),
    ("/a:b/img.sif", ("/a:b/img.sif", "rw")),
])
def test_parse_request(value: str, expected: tuple[str, str]) -> None:
    assert parse_request(value, "rw") == expected


def test_parse_request_default_mode_and_relative() -> None:
    assert parse_request("/i.sif", "ro") == ("/i.sif", "ro")
    with pytest.raises(UsageError, match="needs an absolute path"):
        parse_request("i.sif:ro", "rw")


def test_jobenv_from_prolog_environment() -> None:
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": "1001", "SLURM_JOB_GID": "1002", "SLURM_JOB_USER": "ann",
           "SLURM_JOB_WORK_DIR": "/home/ann", "SPANK_OCI_SIF_OVERLAY": "/img/x.oci.sif:ro"}
    assert JobEnv.from_env(env) == JobEnv("42", 1001, 1002, "ann", "/img/x.oci.sif", "ro", "/home/ann")
    del env["SPANK_OCI_SIF_OVERLAY"]
    assert JobEnv.from_env(env).image is None
    with pytest.raises(UsageError, match="SLURM_JOB_ID='' is not a job id"):
        JobEnv.from_env({})
