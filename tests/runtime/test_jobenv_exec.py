"""The job environment through `sifoverlay exec` (issue 14): identity and network files,
binds, $HOME, the image's Env and WorkingDir, the clean environment - and none of it in
the overlay. The Slurm front end is tested against the same rules in
tests/slurm/test_jobenv.py."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool

from . import images
from .conftest import Env, TestUser

pytestmark = pytest.mark.root
MODES = ["fuse", "kernel"]
IMAGE_ENV = ["PATH=/usr/bin:/bin:/image/bin", "FROM_IMAGE=image", "SHARED=image", "KEEPME=image"]


@pytest.fixture
def extra_group(user: TestUser) -> Iterator[str]:
    """A supplementary group of the test user (removed afterwards)."""
    name = f"sifg{secrets.token_hex(3)}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    subprocess.run(["usermod", "-aG", name, user.name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.fixture
def home(user: TestUser) -> Iterator[Path]:
    """The test user's home directory, created for the test (the user has none)."""
    path = Path(pwd.getpwuid(user.uid).pw_dir)
    assert path != Path("/") and not path.exists(), path
    path.mkdir(parents=True)
    os.chown(path, user.uid, user.gid)
    (path / "dotfile").write_text("mine\n")
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="session")
def config_image(rootfs_tree: Path, scratch: Path, user: TestUser) -> Path:
    """Busybox with an image Env and WorkingDir=/work (which exists in it)."""
    tree = images.clone_tree(rootfs_tree, scratch / "config-rootfs")
    (tree / "work").mkdir(mode=0o755)
    return images.build_image(tree, scratch / "config.oci.sif", scratch / "build-journal", owner=(user.uid, user.gid),
                              image_config={"Env": IMAGE_ENV, "WorkingDir": "/work"})


@pytest.fixture(scope="session")
def getent_image(rootfs_tree: Path, scratch: Path, user: TestUser) -> Path:
    """Busybox plus the host's getent and its glibc (a resolver that reads /etc/hosts)."""
    tree = images.clone_tree(rootfs_tree, scratch / "getent-rootfs")
    images.add_host_binaries(tree, ["getent"], extra_libs=("/lib/x86_64-linux-gnu/libnss_files.so.2",
                                                            "/lib/aarch64-linux-gnu/libnss_files.so.2"))
    return images.build_image(tree, scratch / "getent.oci.sif", scratch / "build-journal", owner=(user.uid, user.gid))


@pytest.mark.parametrize("mode", MODES)
def test_identity_hosts_and_resolv_come_from_the_host(env: Env, mode: str, extra_group: str,
                                                       getent_image: Path) -> None:
    image = images.copy_image(getent_image, env.dir / "getent.oci.sif")
    res = env.exec("--mount", mode, str(image), "--", "sh", "-c",
                   "id; echo ---; cat /etc/hosts; echo ---; cat /etc/resolv.conf; echo ---; "
                   "getent hosts localhost; getent hosts $(hostname); getent passwd $(id -u) | cut -d: -f1")
    assert res.returncode == 0, res.stderr
    ident, hosts, resolv, resolved = res.stdout.split("---\n")
    primary = grp.getgrgid(env.user.gid).gr_name
    extra_gid = grp.getgrnam(extra_group).gr_gid
    groups = ",".join(f"{g}({n})" for g, n in sorted([(env.user.gid, primary), (extra_gid, extra_group)]))
    assert ident.strip() == f"uid={env.user.uid}({env.user.name}) gid={env.user.gid}({primary}) groups={groups}"
    assert hosts == Path("/etc/hosts").read_text()
    assert resolv == Path("/etc/resolv.conf").read_text()
    # both names resolve through the host's /etc/hosts, the uid through the view's passwd
    def host_getent(name: str) -> str:
        return subprocess.run(["getent", "hosts", name], capture_output=True, text=True, check=True).stdout

    node = socket.gethostname()
    assert resolved == host_getent("localhost") + host_getent(node) + env.user.name + "\n"
    assert node in host_getent(node) and "localhost" in host_getent("localhost")
    # the image's own entries stay, the user's are added
    entries = env.exec("--mount", mode, str(env.image), "--", "sh", "-c", "cat /etc/passwd; cat /etc/group")
    lines = entries.stdout.splitlines()
    assert "root:x:0:0:root:/root:/bin/sh" in lines and "nogroup:x:65534:" in lines
    assert any(line.startswith(f"{env.user.name}:x:{env.user.uid}:{env.user.gid}:") for line in lines)
    assert f"{extra_group}:x:{extra_gid}:{env.user.name}" in lines
    # --no-host-files: the image's files as they are
    bare = env.exec("--mount", mode, "--no-host-files", str(env.image), "--", "sh", "-c",
                    "cat /etc/hosts 2>&1; cat /etc/passwd")
    assert env.user.name not in bare.stdout and "127.0.0.1" not in bare.stdout, bare.stdout


@pytest.mark.parametrize("mode", MODES)
def test_bind_writes_reach_the_host_never_the_overlay(env: Env, mode: str, tmp_path: Path, home: Path) -> None:
    require_tool("debugfs")
    data = env.dir / "scratch-dir"
    data.mkdir()
    os.chown(data, env.user.uid, env.user.gid)
    shared = env.dir / "shared-ro"
    shared.mkdir()
    (shared / "input").write_text("dataset\n")
    twin = images.copy_image(env.image, env.dir / "twin.oci.sif")
    job = "echo made > /tmp/job-file"
    res = env.exec("--mount", mode, "-w", "-B", f"{data}:/scratch,{shared}:/data/in:ro", str(env.image), "--",
                   "sh", "-c", f"{job}; id -un; echo out > /scratch/out; cat /data/in/input; cat {home}/dotfile; "
                   "echo x > /data/in/nope 2>/dev/null || echo ro-refused")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{env.user.name}\ndataset\nmine\nro-refused\n"
    out = data / "out"
    assert out.read_text() == "out\n" and (out.stat().st_uid, out.stat().st_gid) == (env.user.uid, env.user.gid)
    assert not (shared / "nope").exists()
    # the same job with no bind, no $HOME, no host files, on a copy of the image
    plain = env.exec("--mount", mode, "-w", "--no-home", "--no-host-files", str(twin), "--", "sh", "-c", job)
    assert plain.returncode == 0, plain.stderr
    assert images.overlay_tree(env.image, tmp_path) == images.overlay_tree(twin, tmp_path)
    # and that digest is not blind: one more file in the overlay changes it
    more = env.exec("--mount", mode, "-w", "--no-home", str(twin), "--", "sh", "-c", "echo 1 > /tmp/other")
    assert more.returncode == 0, more.stderr
    assert images.overlay_tree(env.image, tmp_path) != images.overlay_tree(twin, tmp_path)


def test_bind_source_checked_as_the_user(env: Env) -> None:
    private = env.dir / "root-only"
    private.mkdir(mode=0o700)
    (private / "inside").mkdir()
    res = env.exec("-B", f"{private}/inside:/x", str(env.image), "--", "true")
    assert res.returncode == 2, res.stderr
    assert f"{private}/inside: bind source does not exist or is not readable by uid {env.user.uid}" in res.stderr
    bad = env.exec("-B", "/tmp:/x:rx", str(env.image), "--", "true")
    assert bad.returncode == 2 and "the flag must be ro or rw, not 'rx'" in bad.stderr, bad.stderr


def test_home_bound_unless_no_home(env: Env, home: Path) -> None:
    res = env.exec(str(env.image), "--", "sh", "-c", "echo $HOME; cat $HOME/dotfile; touch $HOME/new")
    assert (res.returncode, res.stdout) == (0, f"{home}\nmine\n"), res.stderr
    assert (home / "new").exists()
    off = env.exec("--no-home", str(env.image), "--", "sh", "-c", f"ls {home} 2>&1; echo $HOME")
    assert off.stdout.splitlines() == [f"ls: {home}: No such file or directory", str(home)], off.stdout


def test_environment_precedence(env: Env, config_image: Path) -> None:
    image = images.copy_image(config_image, env.dir / "cfg.oci.sif")
    caller = {"PATH": "/root/secret/bin:/usr/bin", "SHARED": "job", "KEEPME": "job", "JOBONLY": "job",
              "HOME": "/root", "USER": "root", "SLURM_JOB_ID": "7", "TERM": "xterm", "LC_ALL": "C"}
    argv = env.argv("--env", "KEEPME", "--env", "SET=v=1", "--env", "FROM_IMAGE=override", str(image), "--", "env")
    res = subprocess.run(argv, capture_output=True, text=True, env=caller, cwd="/", timeout=120)
    assert res.returncode == 0, res.stderr
    got = dict(line.split("=", 1) for line in res.stdout.splitlines())
    name = env.user.name
    home = pwd.getpwnam(name).pw_dir
    assert got == {"PATH": "/usr/bin:/bin:/image/bin", "SHARED": "image", "KEEPME": "job", "JOBONLY": "job",
                   "FROM_IMAGE": "override", "SET": "v=1", "HOME": home, "USER": name, "LOGNAME": name,
                   "SLURM_JOB_ID": "7", "TERM": "xterm", "LC_ALL": "C"}
    clean = subprocess.run(env.argv("--cleanenv", str(image), "--", "env"), capture_output=True, text=True,
                           env=caller, cwd="/", timeout=120)
    got = dict(line.split("=", 1) for line in clean.stdout.splitlines())
    assert got == {"PATH": "/usr/bin:/bin:/image/bin", "SHARED": "image", "KEEPME": "image", "FROM_IMAGE": "image",
                   "HOME": home, "USER": name, "LOGNAME": name, "SLURM_JOB_ID": "7", "TERM": "xterm",
                   "LC_ALL": "C"}
    # an image without PATH: as root for another user, root's PATH is not kept
    plain = subprocess.run(env.argv(str(env.image), "--", "sh", "-c", "echo $PATH"), capture_output=True,
                           text=True, env=caller, cwd="/", timeout=120)
    assert plain.stdout == "/usr/sbin:/usr/bin:/sbin:/bin\n"  # the golden image's own Env


def test_workdir_rules(env: Env, config_image: Path) -> None:
    image = str(images.copy_image(config_image, env.dir / "cfg.oci.sif"))
    assert env.exec(image, "--", "pwd", cwd="/tmp").stdout == "/tmp\n"  # the current dir exists inside
    fallback = env.exec(image, "--", "pwd", cwd=str(env.dir))
    assert fallback.stdout == "/work\n"  # the image's WorkingDir
    assert fallback.stderr == (f"sifoverlay: warning: {env.dir} does not exist in the image: working directory "
                               "is /work\n")
    assert env.exec("--pwd", "/etc", image, "--", "pwd", cwd=str(env.dir)).stdout == "/etc\n"
    missing = env.exec("--pwd", "/nowhere", image, "--", "pwd")
    assert missing.returncode == 125, missing
    assert "working directory /nowhere: No such file or directory in the image" in missing.stderr
