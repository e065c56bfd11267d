"""Fixtures for the ext3 tests: small real images, real loop and FUSE mounts."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sifoverlay import ext3
from tests.conftest import require_root, require_tool

MIB = 1 << 20


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check)


@pytest.fixture
def overlay_img(tmp_path: Path) -> Path:
    require_tool("mkfs.ext3")
    path = tmp_path / "overlay.img"
    ext3.make_overlay_fs(path, 64, sparse=True)
    return path


@contextmanager
def kernel_mount(image: Path, mountpoint: Path, *, offset: int = 0, size: int | None = None,
                 read_only: bool = False) -> Iterator[Path]:
    """Kernel ext3 mount of a byte range through a loop device; always cleaned up."""
    require_root()
    require_tool("losetup", "mount", "umount")
    size = size if size is not None else image.stat().st_size - offset
    mountpoint.mkdir(exist_ok=True)
    with ext3.loop_device(image, offset, size, read_only=read_only) as dev:
        opts = "ro,noload" if read_only else "rw"
        sh("mount", "-t", "ext3", "-o", opts, dev, str(mountpoint))
        try:
            yield mountpoint
        finally:
            sh("umount", str(mountpoint))


@contextmanager
def fuse2fs_mount(image: Path, mountpoint: Path, *, read_only: bool = False, offset: int = 0) -> Iterator[Path]:
    """fuse2fs in the foreground; waits for the daemon to exit so its final superblock
    write has landed before the caller looks at the image."""
    require_tool("fuse2fs")
    opts = ["fakeroot"] + (["ro"] if read_only else []) + ([f"offset={offset}"] if offset else [])
    with fuse_daemon(["fuse2fs", "-f", "-o", ",".join(opts), str(image)], mountpoint) as mounted_at:
        yield mounted_at


@contextmanager
def mounted(*argv: str, target: Path) -> Iterator[Path]:
    """Run a mount command; always unmount afterwards."""
    require_root()
    target.mkdir(exist_ok=True)
    sh(*argv, str(target))
    try:
        yield target
    finally:
        sh("umount", str(target))


@contextmanager
def fuse_daemon(argv: list[str], mountpoint: Path) -> Iterator[Path]:
    """A FUSE filesystem in the foreground; unmounted and reaped afterwards."""
    require_root()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen([*argv, str(mountpoint)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} did not mount: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.01)
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            sh("umount", str(mountpoint))
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
