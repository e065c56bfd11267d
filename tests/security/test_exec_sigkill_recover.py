"""Issue 12 (exec): a SIGKILLed `sifoverlay exec` is cleaned up by `sifoverlay recover` -
its leftover processes are gone (the job's pid namespace dies with it), its FUSE daemons
are stopped and its mounts removed first, then the overlay is reconciled, the lease
released and the session closed - without waiting out the lease TTL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sifoverlay.engine import lease, sessions
from sifoverlay.runtime import mounts
from tests.runtime.conftest import (  # noqa: F401  (fixtures)
    Env,
    assert_clean,
    env,
    fuse_for_users,
    golden_image,
    rootfs_tree,
    scratch,
    user,
)
from tests.runtime.test_exec import overlay_consistent
from tests.security.h4_support import subreaper

pytestmark = pytest.mark.root


def _user_procs(uid: int, pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-u", str(uid), "-f", pattern], capture_output=True, text=True).stdout
    return out.split()


def test_sigkilled_exec_is_recovered_without_waiting_for_the_ttl(env: Env) -> None:
    with subreaper():  # the orphans of the killed CLI come to us and are reaped
        _killed_then_recovered(env)


def _killed_then_recovered(env: Env) -> None:
    job = "killed-exec-1"
    marker = f"sleep 977{os.getpid() % 100}"
    proc = subprocess.Popen(env.argv("--job-id", job, "--lease-ttl", "3600", "-w", str(env.image), "--", "sh", "-c",
                                     f"echo before-kill > /tmp/kept; {marker} & {marker}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    written = env.base / job / "rootfs" / "tmp" / "kept"
    deadline = time.monotonic() + 60
    while not (mounts.is_mounted(str(written.parent.parent)) and written.exists()
               and len(_user_procs(env.user.uid, marker)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # only the CLI: nothing of it runs its cleanup
    proc.wait()
    proc.stderr.close()
    # the job's processes (the command and what it started in the background) die with it
    deadline = time.monotonic() + 15
    while _user_procs(env.user.uid, marker):
        assert time.monotonic() < deadline, f"job processes outlived the exec: {_user_procs(env.user.uid, marker)}"
        time.sleep(0.1)
    assert len(mounts.mounts_under(str(env.base / job))) == 3  # layer.0, ext3, rootfs: left for recover
    [left] = sessions.open_sessions(env.journal)
    assert left.job_id == job
    held = lease.inspect(env.image)
    assert held is not None and held.job_id == job and held.expires > time.time() + 3000  # far from expiring

    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "sifoverlay", "recover", "--journal-dir", str(env.journal)],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0, res.stderr
    assert f"{env.image}: exec {job} reconciled" in res.stdout, res.stdout
    assert time.monotonic() - start < 120
    assert mounts.mounts_under(str(env.base)) == []
    assert sessions.open_sessions(env.journal) == []
    assert lease.inspect(env.image) is None
    recorded, actual = overlay_consistent(env.image)
    assert recorded == actual  # the write before the kill was reconciled into the digest
    # the next writer runs at once and sees the data
    res = env.exec("-w", str(env.image), "--", "cat", "/tmp/kept")
    assert (res.returncode, res.stdout) == (0, "before-kill\n"), res.stderr
    again = subprocess.run([sys.executable, "-m", "sifoverlay", "recover", "--journal-dir", str(env.journal)],
                           capture_output=True, text=True, timeout=120, cwd="/")
    assert (again.returncode, again.stdout) == (0, "nothing to recover\n")
    assert_clean(env)


def test_a_live_exec_is_left_alone(env: Env) -> None:
    # the command outlives the test by far: only the SIGTERM below may end it, however slow
    # the machine is (in CI a 20 s command once ended by itself before recover was done)
    proc = subprocess.Popen(env.argv("--job-id", "alive-1", "-w", str(env.image), "--", "sleep", "900"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while not mounts.is_mounted(str(env.base / "alive-1" / "rootfs")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        res = subprocess.run([sys.executable, "-m", "sifoverlay", "recover", "--journal-dir", str(env.journal)],
                             capture_output=True, text=True, timeout=120, cwd="/")
        assert (res.returncode, res.stdout) == (0, "nothing to recover\n"), res.stderr
        assert mounts.is_mounted(str(env.base / "alive-1" / "rootfs"))
        assert proc.poll() is None, proc.communicate()  # recover did not end the live run
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
