"""`sifoverlay exec` end to end, as a real user, real FUSE and kernel mounts."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sifoverlay.engine import lease, sessions
from sifoverlay.ext3 import hash_range
from sifoverlay.ocisif import open_image
from sifoverlay.runtime import find_leftovers, mounts, teardown

from . import images
from .conftest import Env, assert_clean

pytestmark = pytest.mark.root
MODES = ["fuse", "kernel"]


def overlay_consistent(image: Path) -> tuple[str, str]:
    """(recorded digest, sha256 of the ext3 bytes)."""
    with open_image(image) as img:
        assert img.overlay is not None
        return img.overlay.recorded_digest, hash_range(img.sif.fd, img.overlay.offset, img.overlay.size)


@pytest.mark.parametrize("mode", MODES)
def test_writable_persists_readonly_discards(env: Env, mode: str) -> None:
    img = str(env.image)
    first = env.exec("--mount", mode, "--writable", img, "--", "sh", "-c",
                     "id -u; echo hello > /tmp/note; mkdir -p /tmp/d && echo 2 > /tmp/d/two")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(env.user.uid)
    recorded, actual = overlay_consistent(env.image)
    assert recorded == actual  # reconciled after the run
    second = env.exec("--mount", mode, img, "--", "sh", "-c", "cat /tmp/note /tmp/d/two; echo tmp > /tmp/scratch; cat /tmp/scratch")
    assert (second.returncode, second.stdout) == (0, "hello\n2\ntmp\n"), second.stderr
    third = env.exec("--mount", mode, img, "--", "sh", "-c", "test -e /tmp/scratch")
    assert third.returncode == 1  # the read-only run's change was discarded
    # a second writable run can still create files in /tmp (it stays 1777: runtime.copyup)
    fourth = env.exec("--mount", mode, "-w", img, "--", "sh", "-c", "echo more > /tmp/more; stat -c %a /tmp")
    assert (fourth.returncode, fourth.stdout) == (0, "1777\n"), fourth.stderr
    assert overlay_consistent(env.image)[0] == overlay_consistent(env.image)[1]
    assert sessions.open_sessions(env.journal) == []
    assert lease.inspect(env.image) is None and lease.readers(env.image) == []


@pytest.mark.parametrize("mode", MODES)
def test_exit_code_cwd_binds(env: Env, mode: str, tmp_path: Path) -> None:
    img = str(env.image)
    assert env.exec("--mount", mode, img, "--", "sh", "-c", "exit 7").returncode == 7
    assert env.exec("--mount", mode, img, "--", "pwd", cwd="/tmp").stdout == "/tmp\n"  # exists in the image
    assert env.exec("--mount", mode, img, "--", "pwd", cwd=str(env.dir)).stdout == "/\n"  # does not
    share = env.dir / "share"
    share.mkdir()
    (share / "data").write_text("from host\n")
    os.chown(share, env.user.uid, env.user.gid)
    res = env.exec("--mount", mode, "--bind", f"{share}:/home", img, "--", "sh", "-c", "cat /home/data; echo w > /home/w")
    assert (res.returncode, res.stdout) == (0, "from host\n"), res.stderr
    assert (share / "w").read_text() == "w\n"
    ro = env.exec("--mount", mode, "--bind", f"{share}:/home:ro", img, "--", "sh", "-c", "echo x > /home/x")
    assert ro.returncode != 0 and not (share / "x").exists()
    missing = env.exec("--mount", mode, img, "--", "/no/such/cmd")
    assert missing.returncode == 127
    assert "sifoverlay: " in missing.stderr and "/no/such/cmd: command not found in the image" in missing.stderr


def test_imported_vector_as_root(env: Env, vectors: Path) -> None:
    """The product path (import + overlay create) on the vector itself; as root, whose
    fuse-overlayfs can copy up the vector's trusted.* xattrs."""
    image = images.imported_vector(vectors, env.dir / "vector.oci.sif", env.dir / "build-journal")
    res = env.exec("-w", str(image), "--", "sh", "-c", "echo root-was-here > /root/mark; cat /etc/hostname 2>/dev/null; id -u",
                   user="0")
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "0", res.stderr
    again = env.exec(str(image), "--", "cat", "/root/mark", user="0")
    assert (again.returncode, again.stdout) == (0, "root-was-here\n"), again.stderr
    assert overlay_consistent(image)[0] == overlay_consistent(image)[1]


def test_writer_refuses_second_writer_and_readers(env: Env) -> None:
    holder = subprocess.Popen(env.argv("--job-id", "holder-1", "-w", str(env.image), "--", "sh", "-c",
                                       "echo written > /tmp/from-holder; sleep 30"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not mounts.is_mounted(str(env.base / "holder-1" / "rootfs")):
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
            time.sleep(0.1)
        for args in (["-w"], []):
            res = env.exec(*args, str(env.image), "--", "true")
            assert res.returncode == 75, res.stderr
            assert f"held by job holder-1 (cli) on host {os.uname().nodename} pid {holder.pid}" in res.stderr
        waiter = subprocess.Popen(env.argv("--wait", "60", "-w", str(env.image), "--", "cat", "/tmp/from-holder"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting for the lease
    finally:
        holder.send_signal(signal.SIGTERM)  # forwarded to the command; then normal teardown
        holder.communicate(timeout=60)
    assert holder.returncode == 128 + signal.SIGTERM
    out, err = waiter.communicate(timeout=120)
    assert (waiter.returncode, out) == (0, "written\n"), err
    assert overlay_consistent(env.image)[0] == overlay_consistent(env.image)[1]


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@pytest.mark.parametrize("mode", MODES)
def test_crash_leftovers_found_and_removed(env: Env, mode: str) -> None:
    job = f"crash-{mode}"
    proc = subprocess.Popen(env.argv("--mount", mode, "--job-id", job, "--lease-ttl", "1", "-w", str(env.image),
                                     "--", "sh", "-c", "echo before > /tmp/crash; sleep 60"),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    written = env.base / job / "rootfs" / "tmp" / "crash"
    deadline = time.monotonic() + 30
    # the content, not the name: `>` creates the file before echo writes into it (killing
    # in between left an empty file, and the next run rightly read '')
    while not (mounts.is_mounted(str(written.parent.parent)) and _text(written) == "before\n"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the command: no teardown ran
    proc.wait()
    proc.stderr.close()
    assert find_leftovers(env.base) == [job]
    before = mounts.mounts_under(str(env.base / job))
    assert len(before) == 3  # layer.0, ext3, rootfs
    report = teardown(job, base_dir=env.base)
    assert sorted(report.unmounted) == sorted(before) and report.removed
    assert find_leftovers(env.base) == []
    assert teardown(job, base_dir=env.base).unmounted == ()  # idempotent
    assert_clean(env)
    # the dead job's session stays for the sweeper; its lease is stale once expired
    assert [s.job_id for s in sessions.open_sessions(env.journal)] == [job]
    held = lease.inspect(env.image)
    assert held is not None and held.job_id == job
    time.sleep(max(0.0, held.expires - time.time()) + 0.1)
    res = env.exec("--mount", mode, "-w", str(env.image), "--", "cat", "/tmp/crash")
    assert (res.returncode, res.stdout) == (0, "before\n"), res.stderr
    assert overlay_consistent(env.image)[0] == overlay_consistent(env.image)[1]
    sessions.finish(env.journal, job, "cleaned by test")


def test_user_who_cannot_write_is_refused(env: Env) -> None:
    os.chown(env.image, 0, 0)
    os.chmod(env.image, 0o644)
    digest = images.file_digest(env.image)
    res = env.exec("-w", str(env.image), "--", "true")
    assert res.returncode == 77
    assert f"{env.image}: uid {env.user.uid} may not write the image" in res.stderr
    assert images.file_digest(env.image) == digest
    assert env.exec(str(env.image), "--", "true").returncode == 0  # reading is allowed


def test_user_allow_other_is_required(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from sifoverlay.errors import UsageError
    from sifoverlay.runtime import assemble

    conf = env.dir / "fuse.conf"
    conf.write_text("#user_allow_other\nmount_max = 1000\n")
    monkeypatch.setattr(mounts, "FUSE_CONF", str(conf))
    with pytest.raises(UsageError) as exc:
        assemble(env.image, "j1", writable=False, uid=env.user.uid, gid=env.user.gid, base_dir=env.base)
    assert str(exc.value).startswith(f"{conf}: user_allow_other is not set")
    assert not env.base.exists()


def test_no_command_is_a_usage_error(env: Env) -> None:
    res = env.exec(str(env.image))
    assert (res.returncode, res.stderr) == (2, "sifoverlay: no command given: sifoverlay exec IMAGE -- CMD [ARGS...]\n")


def test_not_root_kernel_mode_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An ordinary user runs exec herself (tests/security/test_exec_unprivileged.py), with
    FUSE only: kernel mounts and another user need root."""
    from sifoverlay.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["exec", "--mount", "kernel", str(env.image), "--", "true"]) == 77
    assert capsys.readouterr().err == (f"sifoverlay: {env.image}: --mount kernel needs root (an unprivileged exec "
                                       "mounts with FUSE)\n")


def test_lease_is_heartbeaten_while_the_command_runs(env: Env) -> None:
    proc = subprocess.Popen(env.argv("--job-id", "hb-1", "--lease-ttl", "1.5", "-w", str(env.image), "--", "sleep", "4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while lease.inspect(env.image) is None or not mounts.is_mounted(str(env.base / "hb-1" / "rootfs")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        first = lease.inspect(env.image)
        time.sleep(1.6)  # longer than the ttl: only heartbeats keep it unexpired
        second = lease.inspect(env.image)
        assert first is not None and second is not None and second.token == first.token
        assert second.heartbeat > first.heartbeat and second.expires > time.time()
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert lease.inspect(env.image) is None
