"""Helpers for the upper-conversion tests: a squashfs lower, overlay mounts, manifests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from sifoverlay.upper import is_overlay_xattr
from tests.conftest import require_tool
from tests.ext3.conftest import fuse_daemon, mounted, sh  # noqa: F401 - mount helpers re-exported for tests/upper

Manifest = dict[str, tuple[object, ...]]


def build_lower_tree(src: Path) -> Path:
    """A small lower image tree touching every kind of change the tests make."""
    (src / "a").mkdir(parents=True)
    (src / "a" / "del.txt").write_text("delete me\n")
    (src / "a" / "keep.txt").write_text("keep\n")
    (src / "a" / "replace").write_text("a file that becomes a dir\n")
    (src / "b" / "deep").mkdir(parents=True)
    for i in range(3):
        (src / "b" / f"old{i}.txt").write_text(f"old {i}\n")
        (src / "b" / "deep" / f"d{i}").write_text(f"deep {i}\n")
    (src / "c").mkdir()
    (src / "c" / "mod.txt").write_text("original\n")
    (src / "c" / "perm.txt").write_text("perm\n")
    (src / "c" / "owner.txt").write_text("owner\n")
    (src / "c" / "xattr.txt").write_text("xattr\n")
    os.setxattr(src / "c" / "xattr.txt", "user.lower", b"from-lower")
    (src / "c" / "link-src.txt").write_text("linked\n")
    (src / "gone-dir" / "sub").mkdir(parents=True)
    (src / "gone-dir" / "sub" / "f").write_text("gone\n")
    os.symlink("a/keep.txt", src / "lower-link")
    os.chmod(src, 0o755)
    return src


def mksquashfs(src: Path, out: Path) -> Path:
    require_tool("mksquashfs")
    sh("mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress",
       "-comp", "zstd", "-Xcompression-level", "1")
    return out


def apply_changes(merged: Path) -> None:
    """The same user-visible changes for the kernel and the fuse-overlayfs runs."""
    (merged / "a" / "del.txt").unlink()                        # whiteout of a file
    sh("rm", "-rf", str(merged / "b"))                         # whiteout of a dir ...
    (merged / "b").mkdir()                                     # ... recreated: opaque
    (merged / "b" / "new.txt").write_text("new in b\n")
    with open(merged / "c" / "mod.txt", "a") as f:              # copy-up + modify
        f.write("modified\n")
    (merged / "newdir").mkdir()
    (merged / "newdir" / "x").write_text("x\n")
    (merged / "newdir" / "big.bin").write_bytes(os.urandom(5 << 20) + b"tail")
    (merged / "top-new.txt").write_text("top\n")
    os.symlink("c/mod.txt", merged / "newlink")
    os.link(merged / "newdir" / "x", merged / "newdir" / "hl")   # new hard link
    os.link(merged / "c" / "link-src.txt", merged / "c" / "link-dst.txt")  # copy-up + link
    os.chmod(merged / "c" / "perm.txt", 0o600)
    os.chown(merged / "c" / "owner.txt", 1234, 5678)
    os.setxattr(merged / "newdir" / "x", "user.note", b"\x00binary\xff")
    sh("rm", "-rf", str(merged / "gone-dir"))
    (merged / "a" / "replace").unlink()                         # file replaced by a dir
    (merged / "a" / "replace").mkdir()
    (merged / "a" / "replace" / "inside").write_text("inside\n")


def manifest(root: Path) -> Manifest:
    """path -> (type, mode, uid, gid, size, sha256, link target, rdev, xattrs).

    The root directory itself is left out: its attributes come from whichever layer
    provides the mount root, which differs between the views being compared. Hard-link
    identity is checked separately (`same_inode`): kernel overlayfs reports copied-up
    files by their lower inode numbers, so links made after a copy-up look distinct.
    """
    entries: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            digest = size = target = rdev = None
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                names = []
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in names if not is_overlay_xattr(n)))
            entries[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            size, digest, target, rdev, xattrs)
    return entries


def same_inode(root: Path, *paths: str) -> bool:
    keys = {(os.lstat(root / p).st_dev, os.lstat(root / p).st_ino) for p in paths}
    return len(keys) == 1


def assert_same_tree(actual: Manifest, expected: Manifest) -> None:
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    details = {k: (expected[k], actual[k]) for k in differ[:5]}
    assert not (missing or extra or differ), f"missing={missing} extra={extra} differ={details}"


def umoci_apply(layers: list[Path], workdir: Path) -> Path:
    """Apply tar layers in order with umoci (an independent OCI implementation)."""
    require_tool("umoci")
    layout = workdir / "layout"
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:t")
    for layer in layers:
        sh("umoci", "raw", "add-layer", "--image", f"{layout}:t", str(layer.resolve()))
    bundle = workdir / "bundle"
    sh("umoci", "unpack", "--image", f"{layout}:t", str(bundle))
    return bundle / "rootfs"
