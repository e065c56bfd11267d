"""A SIGTERM (scancel, systemd, a wrapper's timeout) that reaches `sifoverlay exec` while
the run is still being set up must end the run like one during the command: exit 143,
nothing left mounted, the lease released and the session closed. Before the fix the CLI
died with the default action half way (mounts and session left for `recover`), and a
signal that reached the job's pid 1 before it had a handler was dropped by the kernel,
so the command ran to its end (CI saw `sleep 20` exit 0 after a SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
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

pytestmark = pytest.mark.root


def _start(env: Env, job: str) -> subprocess.Popen[str]:
    return subprocess.Popen(env.argv("--job-id", job, "-w", str(env.image), "--", "sleep", "900"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _ends_terminated_and_clean(env: Env, proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(timeout=120)  # `sleep 900` never ends on its own within this
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert sessions.open_sessions(env.journal) == []
    assert lease.inspect(env.image) is None
    assert_clean(env)
    return err


def test_term_while_the_rootfs_is_mounted_but_the_command_not_yet_started(env: Env) -> None:
    # the window in which the job's pid 1 has no handler yet: hit it several times
    for n in range(5):
        proc = _start(env, f"early-{n}")
        deadline = time.monotonic() + 60
        while not mounts.is_mounted(str(env.base / f"early-{n}" / "rootfs")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _ends_terminated_and_clean(env, proc)


def test_term_before_anything_is_mounted_never_starts_the_command(env: Env) -> None:
    proc = _start(env, "setup-1")
    deadline = time.monotonic() + 60
    while not sessions.open_sessions(env.journal):  # lease taken, session opened, mounts to come
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    err = _ends_terminated_and_clean(env, proc)
    assert "SIGTERM received before the command started" in err, err


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
def test_term_at_any_moment_of_the_start(env: Env, delay: float) -> None:
    proc = _start(env, "any-1")
    deadline = time.monotonic() + 60
    while not sessions.open_sessions(env.journal):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _ends_terminated_and_clean(env, proc)
