"""The Prolog's plan of a job's view (sifoverlay/slurm/taskview.py) without a cluster:
plugstack binds= and home=, the job's SPANK_OCI_SIF_* requests, the record the plugin
reads (format in slurm_plugin/src/taskview.c), and the image config it carries."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.runtime import jobview
from sifoverlay.slurm import taskview
from sifoverlay.slurm.config import SlurmConfig, parse_args


def test_plugstack_binds_and_home_are_checked() -> None:
    config = parse_args(["binds=/scratch,/shared:ro,/data:/in:rw", "home=no"])
    assert (config.binds, config.home) == ("/scratch,/shared:ro,/data:/in:rw", False)
    assert parse_args([]).home is True and parse_args([]).binds == ""
    for arg, message in (("binds=relative", "SRC and DST must be absolute paths"),
                         ("binds=/a:/b:rx", "the flag must be ro or rw, not 'rx'"),
                         ("binds=/a/../etc", "no '..', tab or newline in paths"),
                         ("home=maybe", "home=maybe: expected yes or no")):
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_args([arg], source="plugstack.conf")


def test_bind_syntax() -> None:
    parse = jobview.Bind.parse
    assert parse("/a") == jobview.Bind("/a", "/a", False)
    assert parse("/a:ro") == jobview.Bind("/a", "/a", True)
    assert parse("/a:/b") == jobview.Bind("/a", "/b", False)
    assert parse("/a/:/b/:rw") == jobview.Bind("/a", "/b", False)
    assert parse("data:/d", cwd="/home/u") == jobview.Bind("/home/u/data", "/d", False)
    with pytest.raises(UsageError, match="expected SRC"):
        parse("/a:/b:ro:x")


def test_plan_as_root_for_a_job(tmp_path: Path) -> None:
    """Root's plan for uid 0 (no user to check as): site binds skipped when missing on the
    node, the job's own mounts, $HOME per plugstack/option, identity and host files."""
    site = tmp_path / "site"
    site.mkdir()
    mine = tmp_path / "mine.txt"
    mine.write_text("x")
    config = SlurmConfig(binds=f"{site}:/site:ro,{tmp_path}/not-here", runtime_dir=str(tmp_path / "run"))
    env = {"SPANK_OCI_SIF_MOUNTS": f"{mine}:/in/file.txt"}
    home = pwd.getpwuid(0).pw_dir
    view = taskview.plan(0, 0, config.mounts_dir, "42", config, env)
    job_dir = os.path.join(config.mounts_dir, "42")
    got = [(b.source, b.dest, b.readonly, b.system, b.is_dir) for b in view.binds]
    expected = [(f"{job_dir}/view/passwd", "/etc/passwd", True, True, False),
                (f"{job_dir}/view/group", "/etc/group", True, True, False)]
    expected += [(f, f, True, True, False) for f in ("/etc/hosts", "/etc/resolv.conf") if os.path.exists(f)]
    expected += [(home, home, False, False, True)] if os.path.isdir(home) and home != "/" else []
    expected += [(str(site), "/site", True, True, True), (str(mine), "/in/file.txt", False, False, False)]
    assert got == expected
    assert view.mountpoints == [*((b[1], b[4]) for b in expected), ("/.sifoverlay/pmix", True)]
    no_home = taskview.plan(0, 0, config.mounts_dir, "42", config, {"SPANK_OCI_SIF_NO_HOME": "1"})
    assert all(b.dest != home for b in no_home.binds)
    admin_no_home = taskview.plan(0, 0, config.mounts_dir, "42", SlurmConfig(home=False), {})
    assert all(b.dest != home for b in admin_no_home.binds)
    missing = {"SPANK_OCI_SIF_MOUNTS": f"{tmp_path}/nope:/x"}
    with pytest.raises(UsageError, match="bind source does not exist or is not readable by uid 0"):
        taskview.plan(0, 0, config.mounts_dir, "42", config, missing)


def test_merge_identity_files() -> None:
    ident = jobview.Identity("alice", 1000, 1000, "/home/alice", "/bin/bash", "Alice: A",
                             (("alice", 1000), ("gpu", 44)))
    image_passwd = "root:x:0:0:root:/root:/bin/sh\nalice:x:5:5::/:/bin/false\nold:x:1000:1000::/:/bin/sh\n"
    assert jobview.merge_passwd(image_passwd, ident) == (
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice  A:/home/alice:/bin/bash\n")
    assert jobview.merge_passwd("", ident).splitlines()[0] == "root:x:0:0:root:/root:/bin/sh"
    image_group = "root:x:0:\nvideo:x:44:\ngpu:x:99:\nusers:x:100:\n"
    assert jobview.merge_group(image_group, ident) == "root:x:0:\nusers:x:100:\nalice:x:1000:\ngpu:x:44:alice\n"


def test_finish_writes_the_view_record(tmp_path: Path, busybox_image: Path) -> None:
    """The record the task hook reads: binds (tab-separated), the image's Env in order and
    its WorkingDir; identity files in the job's view/ dir."""
    config = SlurmConfig(runtime_dir=str(tmp_path / "run"))
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text("daemon:x:1:1::/:/bin/false\n")
    data = tmp_path / "data"
    data.mkdir()
    view = taskview.plan(0, 0, config.mounts_dir, "7", config,
                         {"SPANK_OCI_SIF_MOUNTS": f"{data}:/data:ro", "SPANK_OCI_SIF_NO_HOME": "1"})
    os.makedirs(view.job_dir)
    fd = os.open(busybox_image, os.O_RDONLY)
    try:
        path = taskview.finish(view, config, "7", str(rootfs), fd)
    finally:
        os.close(fd)
    assert path == f"{config.runtime_dir}/slurm/7/view"
    lines = Path(path).read_text().splitlines()
    binds = [line for line in lines if line.startswith("bind=")]
    assert binds[:2] == [f"bind=ro\tsys\t{view.job_dir}/view/passwd\t/etc/passwd",
                         f"bind=ro\tsys\t{view.job_dir}/view/group\t/etc/group"]
    assert binds[-1] == f"bind=ro\tuser\t{data}\t/data"
    assert [line for line in lines if not line.startswith("bind=")] == [
        "env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]  # busybox-layout's config
    passwd = (Path(view.job_dir) / "view" / "passwd").read_text().splitlines()
    assert passwd[0] == "daemon:x:1:1::/:/bin/false" and passwd[-1].startswith("root:x:0:0:")
