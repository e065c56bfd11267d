"""Issue 12 (exec): `sifoverlay exec` works for an ordinary user - FUSE mounts through
fusermount3, the command in her own user + mount + pid namespace - so nobody needs sudo
(and so nobody needs to be granted root for it). The overlay is replayed/reconciled by
her, the lease and session are hers, nothing is left mounted or running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifoverlay.runtime import mounts
from tests.runtime.conftest import (  # noqa: F401  (fixtures)
    Env,
    env,
    fuse_for_users,
    golden_image,
    rootfs_tree,
    scratch,
    user,
)
from tests.conftest import REPO
from tests.security.h4_support import live_processes, reap, subreaper
from tests.runtime.test_exec import overlay_consistent

pytestmark = pytest.mark.root  # (root only to create the user and make /dev/fuse usable)


# A copy of the package that any user can read: the checkout may sit below a directory
# only root can traverse (a clone under /root), and the test user imports sifoverlay.
_PACKAGE_ROOT = [str(REPO)]


@pytest.fixture(scope="module", autouse=True)
def readable_package() -> Iterator[None]:
    import shutil

    root = Path(tempfile.mkdtemp(prefix="sifoverlay-pkg-"))
    shutil.copytree(REPO / "sifoverlay", root / "sifoverlay", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    _PACKAGE_ROOT[0] = str(root)
    try:
        yield
    finally:
        _PACKAGE_ROOT[0] = str(REPO)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def home(env: Env) -> Iterator[Path]:
    """The user's XDG runtime/state directories (the test user has no home)."""
    path = Path(tempfile.mkdtemp(prefix="home-", dir=env.dir))
    for sub in ("run", "state"):
        (path / sub).mkdir(mode=0o700)
    subprocess.run(["chown", "-R", f"{env.user.uid}:{env.user.gid}", str(path)], check=True)
    path.chmod(0o755)
    yield path


def user_python() -> str:
    """An interpreter the test user may run (the test venv may live under root's 0700
    home): this one if she can, else the system python3 with the checkout on PYTHONPATH."""
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-x",
                            sys.executable], capture_output=True)
    if probe.returncode == 0 and not sys.executable.startswith("/root/"):
        return sys.executable
    return "/usr/bin/python3"


def as_user(e: Env, home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": str(home),
               "XDG_RUNTIME_DIR": str(home / "run"), "XDG_STATE_HOME": str(home / "state"),
               "PYTHONPATH": _PACKAGE_ROOT[0]}
    return subprocess.run([user_python(), "-m", "sifoverlay", *args], user=e.user.uid, group=e.user.gid,
                          extra_groups=[], env=environ, cwd="/", capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_unprivileged_writable_exec_persists_and_reconciles(env: Env, home: Path) -> None:
    res = as_user(env, home, "exec", "-w", str(env.image), "--", "sh", "-c",
                  "echo by-user > /tmp/mine; id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; echo $$")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[0] == str(env.user.uid)
    assert lines[1].split() == ["NoNewPrivs:", "1"] or lines[1].split() == ["CapEff:", "0000000000000000"]
    assert "CapEff:\t0000000000000000" in res.stdout and "NoNewPrivs:\t1" in res.stdout
    assert lines[3] == "2"  # pid 2 of its own pid namespace (pid 1 waits for it)
    recorded, actual = overlay_consistent(env.image)
    assert recorded == actual  # reconciled by the user herself
    again = as_user(env, home, "exec", str(env.image), "--", "cat", "/tmp/mine")
    assert (again.returncode, again.stdout) == (0, "by-user\n"), again.stderr
    assert mounts.mounts_under(str(home)) == []
    assert subprocess.run(["pgrep", "-u", str(env.user.uid)], capture_output=True).stdout == b""


def test_unprivileged_exec_reaches_no_further_than_the_user(env: Env, home: Path) -> None:
    secret = env.dir / "root-secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("root only\n")
    share = home / "share"
    share.mkdir()
    (share / "data").write_text("hers\n")
    subprocess.run(["chown", "-R", f"{env.user.uid}:{env.user.gid}", str(share)], check=True)
    res = as_user(env, home, "exec", "--bind", f"{share}:/home:ro", "--bind", f"{secret}:/root", str(env.image), "--",
                  "sh", "-c", "cat /home/data; cat /root/key; echo x > /home/new")
    # a source she cannot read is refused before anything runs (runtime.jobview.check_sources)
    assert res.stdout == "" and res.returncode == 2, (res.stdout, res.stderr)
    assert f"{secret}: bind source does not exist or is not readable by uid {env.user.uid}" in res.stderr
    res = as_user(env, home, "exec", "--bind", f"{share}:/home:ro", str(env.image), "--",
                  "sh", "-c", "cat /home/data; cat /root/key; echo x > /home/new")
    assert res.stdout == "hers\n", (res.stdout, res.stderr)
    assert "root only" not in res.stdout and res.returncode != 0
    assert not (share / "new").exists()
    for refused in (["--mount", "kernel"], ["--user", "0"]):
        res = as_user(env, home, "exec", *refused, str(env.image), "--", "true")
        assert res.returncode == 77 and "needs root" in res.stderr, res.stderr
    assert mounts.mounts_under(str(home)) == []


def test_unprivileged_sigkilled_exec_is_recovered_by_the_user(env: Env, home: Path) -> None:
    """The user's own `sifoverlay recover` finishes her SIGKILLed run: fusermount3 -u, the
    reconcile, her lease and session - no root, no TTL wait."""
    environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": str(home),
               "XDG_RUNTIME_DIR": str(home / "run"), "XDG_STATE_HOME": str(home / "state"), "PYTHONPATH": _PACKAGE_ROOT[0]}
    with subreaper():
        _killed_then_recovered(env, home, environ)


def _killed_then_recovered(env: Env, home: Path, environ: dict[str, str]) -> None:
    proc = subprocess.Popen([user_python(), "-m", "sifoverlay", "exec", "--lease-ttl", "3600", "-w", str(env.image),
                             "--", "sh", "-c", "echo kept > /tmp/kept; sleep 600"],
                            user=env.user.uid, group=env.user.gid, extra_groups=[], env=environ, cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jobs = home / "run" / "sifoverlay" / "jobs"
    deadline = time.monotonic() + 60
    while not subprocess.run(["pgrep", "-u", str(env.user.uid), "-f", "^sleep 600$"], capture_output=True).stdout:
        # (root cannot look into her mounts: no allow_other; the command runs after its write)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()
    deadline = time.monotonic() + 15
    while subprocess.run(["pgrep", "-u", str(env.user.uid), "-f", "^sleep 600$"], capture_output=True).stdout:
        assert time.monotonic() < deadline, "the job's processes outlived the exec"
        time.sleep(0.1)
    assert mounts.mounts_under(str(jobs))  # left for recover
    res = as_user(env, home, "recover")
    assert res.returncode == 0, res.stderr
    assert f"{env.image}: exec " in res.stdout and " reconciled" in res.stdout, res.stdout
    assert mounts.mounts_under(str(home)) == []
    reap()
    assert live_processes(env.user.uid) == []
    recorded, actual = overlay_consistent(env.image)
    assert recorded == actual
    again = as_user(env, home, "exec", "-w", str(env.image), "--", "cat", "/tmp/kept")
    assert (again.returncode, again.stdout) == (0, "kept\n"), again.stderr
