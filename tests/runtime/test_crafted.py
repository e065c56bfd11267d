"""Crafted images fail cleanly, in both mount modes, without harming the node: one
error line, image bytes unchanged, nothing mounted, no loop device, no daemon left."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import images
from .conftest import Env, assert_clean

pytestmark = pytest.mark.root
MODES = ["fuse", "kernel"]


@pytest.mark.parametrize("writable", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_corrupt_superblock(env: Env, mode: str, writable: bool) -> None:
    images.corrupt_superblock(env.image)
    offset, _ = images.overlay_region(env.image)
    digest = images.file_digest(env.image)
    res = env.exec("--mount", mode, *(["-w"] if writable else []), str(env.image), "--", "true")
    assert res.returncode == 2
    assert res.stderr.strip() == (f"sifoverlay: {env.image}: ext3 overlay at offset {offset}: "
                                  "no ext2/3/4 superblock: magic is 0x0000, expected 0xef53")
    assert images.file_digest(env.image) == digest
    assert_clean(env)


@pytest.mark.parametrize("writable", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_huge_inode_count(env: Env, mode: str, writable: bool) -> None:
    images.huge_inode_count(env.image)
    offset, _ = images.overlay_region(env.image)
    digest = images.file_digest(env.image)
    res = env.exec("--mount", mode, *(["-w"] if writable else []), str(env.image), "--", "true")
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    if mode == "fuse":  # fuse2fs, as the user, refuses it
        assert res.returncode == 1
        # fuse2fs names its device, the inherited fd: /proc/self/fd/N
        expected = (re.escape(f"sifoverlay: {env.image}: fuse2fs could not mount the ext3 overlay: "
                              + ("" if writable else "Mounting read-only. | "))
                    + r"(/proc/self/fd/\d+): The ext2 superblock is corrupt\. \| Please run e2fsck -fy \1\.")
        assert re.fullmatch(expected, lines[0]), lines[0]
    else:  # the userspace e2fsck gate refuses it before the kernel driver sees it
        assert res.returncode == 2
        assert lines[0] == (f"sifoverlay: {env.image}: ext3 overlay at offset {offset}: primary superblock unusable: "
                            "dumpe2fs: The ext2 superblock is corrupt while trying to open the overlay | "
                            "Couldn't find valid filesystem superblock."), lines[0]
    assert images.file_digest(env.image) == digest
    assert_clean(env)


@pytest.mark.parametrize("mode", MODES)
def test_symlink_loop_in_squashfs_layer(env: Env, loop_image: Path, mode: str) -> None:
    image = images.copy_image(loop_image, env.dir / "loop.oci.sif")
    res = env.exec("--mount", mode, str(image), "--", "cat", "/loop/a")
    assert (res.returncode, res.stderr) == (1, "cat: can't open '/loop/a': Too many levels of symbolic links\n")
    res = env.exec("--mount", mode, str(image), "--", "/selfloop")
    assert res.returncode == 125
    assert "/selfloop: cannot execute: Too many levels of symbolic links" in res.stderr
    share = env.dir / "share"
    share.mkdir()
    res = env.exec("--mount", mode, "--bind", f"{share}:/loop/a", str(image), "--", "true")
    assert res.returncode == 125
    assert res.stderr.strip() == (f"sifoverlay: {image}: bind {share}: destination /loop/a: "
                                  "Too many levels of symbolic links (symlink loop in the image)")
    ok = env.exec("--mount", mode, "--writable", str(image), "--", "sh", "-c", "ls /loop; echo fine > /tmp/ok")
    assert (ok.returncode, ok.stdout) == (0, "a\nb\n"), ok.stderr
    assert_clean(env)
