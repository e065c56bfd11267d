"""Real uppers written by kernel overlayfs and by fuse-overlayfs, converted and re-applied.

For each upper: the tar layer applied by umoci on top of the lower, and the squashfs
layer mounted as an overlayfs lower on top of the lower squashfs, must both show exactly
the tree seen through the live overlay mount.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest

from sifoverlay import ext3
from sifoverlay.upper import upper_to_squashfs, upper_to_tar
from tests.conftest import require_root, require_tool
from tests.ext3.conftest import fuse2fs_mount, kernel_mount, sh
from tests.upper.conftest import (
    Manifest,
    apply_changes,
    assert_same_tree,
    build_lower_tree,
    fuse_daemon,
    manifest,
    mksquashfs,
    mounted,
    same_inode,
    umoci_apply,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _lower(tmp_path: Path) -> tuple[Path, Path]:
    require_root()
    require_tool("mksquashfs", "tar2sqfs", "umoci", "tar")
    src = build_lower_tree(tmp_path / "src")
    lower_tar = tmp_path / "lower.tar"
    sh("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name",
       "-C", str(src), "-cf", str(lower_tar), ".")
    return mksquashfs(src, tmp_path / "lower.sqfs"), lower_tar


def _convert(upper: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Both conversions, checking the returned digests/sizes and determinism."""
    tar_path = tmp_path / "upper.tar"
    with open(tar_path, "wb") as f:
        diff_id, size = upper_to_tar(upper, f)
    data = tar_path.read_bytes()
    assert (diff_id, size) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    with open(tmp_path / "again.tar", "wb") as f:
        assert upper_to_tar(upper, f) == (diff_id, size)

    sqfs = tmp_path / "layer.sqfs"
    digest, sq_size = upper_to_squashfs(upper, sqfs)
    assert (digest, sq_size) == ("sha256:" + hashlib.sha256(sqfs.read_bytes()).hexdigest(), sqfs.stat().st_size)
    assert upper_to_squashfs(upper, tmp_path / "again.sqfs") == (digest, sq_size)
    return tar_path, sqfs


def _check_tar_conventions(tar_path: Path) -> None:
    with tarfile.open(tar_path) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members["a/.wh.del.txt"].isreg() and members["a/.wh.del.txt"].size == 0
    assert members["a/.wh.del.txt"].mode == 0o600
    assert members[".wh.gone-dir"].isreg()
    assert members["b/.wh..wh..opq"].isreg() and members["b/.wh..wh..opq"].mode == 0o600
    assert "b/.wh..opq" not in members and "b/.wh.old0.txt" not in members  # opaque covers them
    # sorted order: "hl" comes first and carries the data, "x" links to it
    assert members["newdir/hl"].isreg() and members["newdir/x"].islnk()
    assert members["newdir/x"].linkname == "newdir/hl"
    assert not any(m.islnk() and ".wh." in (m.name + m.linkname) for m in members.values())
    assert not any(m.ischr() for m in members.values())
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    assert members["c/owner.txt"].uid == 1234 and members["c/owner.txt"].gid == 5678
    for m in members.values():
        assert not any(".overlay." in key or "fuseoverlayfs" in key for key in m.pax_headers), m.name
    assert members["newdir/hl"].pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") \
        == b"\x00binary\xff"
    names = [m for m in members]
    assert names.index("b") + 1 == names.index("b/.wh..wh..opq")  # marker right after its dir


def _verify_layers(tmp_path: Path, lower_sqfs: Path, lower_tar: Path, tar_path: Path, sqfs: Path,
                   expected: Manifest) -> None:
    with mounted("mount", "-t", "squashfs", "-o", "ro,loop", str(lower_sqfs), target=tmp_path / "v-lower") as lm, \
         mounted("mount", "-t", "squashfs", "-o", "ro,loop", str(sqfs), target=tmp_path / "v-layer") as ly, \
         mounted("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={ly}:{lm}", target=tmp_path / "v-merged") as v:
        assert_same_tree(manifest(v), expected)
        assert same_inode(v, "newdir/hl", "newdir/x") and same_inode(v, "c/link-src.txt", "c/link-dst.txt")
    rootfs = umoci_apply([lower_tar, tar_path], tmp_path / "umoci")
    assert_same_tree(manifest(rootfs), expected)
    assert same_inode(rootfs, "newdir/hl", "newdir/x") and same_inode(rootfs, "c/link-src.txt", "c/link-dst.txt")


@pytest.mark.parametrize("namespace", ["trusted", "user"])
def test_kernel_overlayfs_upper(tmp_path: Path, namespace: str) -> None:
    """namespace "user": the mount uses -o userxattr (as inside a user namespace)."""
    lower_sqfs, lower_tar = _lower(tmp_path)
    img = tmp_path / "overlay.img"
    ext3.make_overlay_fs(img, 64, sparse=True)
    with mounted("mount", "-t", "squashfs", "-o", "ro,loop", str(lower_sqfs), target=tmp_path / "lower") as lm, \
         kernel_mount(img, tmp_path / "ext3") as em:
        opts = f"lowerdir={lm},upperdir={em}/upper,workdir={em}/work"
        if namespace == "user":
            opts += ",userxattr"
        with mounted("mount", "-t", "overlay", "overlay", "-o", opts, target=tmp_path / "merged") as merged:
            apply_changes(merged)
            expected = manifest(merged)
            assert same_inode(merged, "newdir/hl", "newdir/x")
        upper = em / "upper"
        # The kernel convention really is what we convert from.
        whiteout = os.lstat(upper / "a" / "del.txt")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        assert os.getxattr(upper / "b", f"{namespace}.overlay.opaque") == b"y"
        assert not any(n.startswith("trusted.overlay.") for n in os.listxattr(upper / "b")) or namespace == "trusted"
        if namespace == "trusted":
            assert "trusted.overlay.origin" in os.listxattr(upper / "c" / "mod.txt")
        tar_path, sqfs = _convert(upper, tmp_path)
    assert "gone-dir" not in expected and "b/old0.txt" not in expected and "b/new.txt" in expected
    _check_tar_conventions(tar_path)
    _verify_layers(tmp_path, lower_sqfs, lower_tar, tar_path, sqfs, expected)


def test_fuse_overlayfs_upper_on_fuse2fs(tmp_path: Path) -> None:
    require_tool("fuse-overlayfs", "fuse2fs")
    lower_sqfs, lower_tar = _lower(tmp_path)
    img = tmp_path / "overlay.img"
    ext3.make_overlay_fs(img, 64, sparse=True)
    with mounted("mount", "-t", "squashfs", "-o", "ro,loop", str(lower_sqfs), target=tmp_path / "lower") as lm, \
         fuse2fs_mount(img, tmp_path / "ext3") as em:
        opts = f"lowerdir={lm},upperdir={em}/upper,workdir={em}/work"
        with fuse_daemon(["fuse-overlayfs", "-f", "-o", opts], tmp_path / "merged") as merged:
            apply_changes(merged)
            expected = manifest(merged)
            assert same_inode(merged, "newdir/hl", "newdir/x")
        upper = em / "upper"
        # fuse-overlayfs on fuse2fs writes AUFS-style whiteouts and the opaque sentinel.
        assert stat.S_ISREG(os.lstat(upper / "a" / ".wh.del.txt").st_mode)
        assert not os.path.lexists(upper / "a" / "del.txt")
        assert (upper / "b" / ".wh..wh..opq").is_file()
        stray = os.lstat(upper / "b" / ".wh..opq")  # SingularityCE #3176: must not reach a layer
        assert stat.S_ISCHR(stray.st_mode) and stray.st_rdev == 0
        tar_path, sqfs = _convert(upper, tmp_path)
    assert "gone-dir" not in expected and "b/old0.txt" not in expected and "b/new.txt" in expected
    _check_tar_conventions(tar_path)
    _verify_layers(tmp_path, lower_sqfs, lower_tar, tar_path, sqfs, expected)
    fp = ext3.Superblock.read(img)
    assert fp.is_clean and fp.mnt_count == 1
