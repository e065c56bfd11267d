"""engine.procs: process identity (pid + start time), zombies, boot id, mountinfo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sifoverlay.engine import procs


def test_live_process_is_alive_only_with_its_own_start_time() -> None:
    me = os.getpid()
    started = procs.process_start_ticks(me)
    assert isinstance(started, int) and started > 0
    assert procs.process_alive(me, started)
    assert procs.process_alive(me, None)
    assert not procs.process_alive(me, started + 1)  # same pid, another process (pid reuse)
    assert not procs.process_alive(0, None) and not procs.process_alive(None, None)


def test_exited_and_zombie_processes_are_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = procs.process_start_ticks(child.pid)
    deadline = time.monotonic() + 30
    while procs.process_alive(child.pid, started) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert procs.pid_exists(child.pid)  # not reaped yet: a zombie
    assert not procs.process_alive(child.pid, started)
    assert not procs.process_alive(child.pid, None)
    child.wait(timeout=30)
    assert not procs.pid_exists(child.pid)
    assert procs.process_start_ticks(child.pid) is None


def test_boot_id_is_this_boots() -> None:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
        assert procs.boot_id() == fh.read().strip()


def test_mountinfo_is_parsed_and_unescaped(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 0:50 / /mnt/my\\040dir rw,nosuid shared:1 - fuse.fuse2fs /img/a\\134b.sif rw,user_id=0\n"
        "garbage line without separator\n"
        "40 35 0:54 / /proc rw - proc proc rw\n"
    )
    assert procs.mountinfo(str(info)) == [
        procs.MountEntry(36, "/mnt/my dir", "fuse.fuse2fs", "/img/a\\b.sif", "rw,nosuid", "0:50", "rw,user_id=0"),
        procs.MountEntry(40, "/proc", "proc", "proc", "rw", "0:54", "rw"),
    ]
    assert procs.unescape_mount_field("a\\011b\\012c\\") == "a\tb\nc\\"
    root = [e for e in procs.mountinfo() if e.target == "/"]
    assert root, "/ is always mounted"
