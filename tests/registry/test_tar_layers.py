"""`push --layer-format tar`, checked by independent clients: skopeo pulls the image back
into an OCI layout, umoci unpacks it, and the tree must equal the rootfs seen through a
kernel overlayfs mount of the image's squashfs layers + its ext3 overlay."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from contextlib import ExitStack
from pathlib import Path

import pytest

from sifoverlay.ocisif import open_image
from tests.conftest import require_root, require_tool
from tests.ext3.conftest import fuse_daemon, mounted

from .conftest import Registry, build_ocisif, run_cli, sh, squashfs_from

pytestmark = [pytest.mark.registry, pytest.mark.root]
Manifest = dict[str, tuple[object, ...]]


def lower0(tree: Path) -> Path:
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "del.txt").write_text("delete me\n")
    (tree / "a" / "keep.txt").write_text("keep\n")
    (tree / "b" / "deep").mkdir(parents=True)
    for i in range(3):
        (tree / "b" / f"old{i}.txt").write_text(f"old {i}\n")
        (tree / "b" / "deep" / f"d{i}").write_text(f"deep {i}\n")
    (tree / "c").mkdir()
    for name in ("mod.txt", "perm.txt", "owner.txt"):
        (tree / "c" / name).write_text(f"{name}\n")
    (tree / "c" / "hl1").write_text("hard linked in the lower layer\n")
    os.link(tree / "c" / "hl1", tree / "c" / "hl2")
    os.setxattr(tree / "c" / "mod.txt", "user.lower", b"from-lower")
    (tree / "w").mkdir()
    (tree / "w" / "gone.txt").write_text("deleted by layer 1\n")
    (tree / "opq").mkdir()
    (tree / "opq" / "o1").write_text("hidden by layer 1's opaque dir\n")
    (tree / "gone-dir" / "sub").mkdir(parents=True)
    (tree / "gone-dir" / "sub" / "f").write_text("gone\n")
    os.symlink("a/keep.txt", tree / "lower-link")
    os.chmod(tree, 0o755)
    return tree


def lower1(tree: Path) -> Path:
    """A squashfs layer in the overlayfs convention: a 0:0 whiteout and an opaque dir."""
    (tree / "w").mkdir(parents=True)
    os.mknod(tree / "w" / "gone.txt", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (tree / "opq").mkdir()
    os.setxattr(tree / "opq", "trusted.overlay.opaque", b"y")
    (tree / "opq" / "o2").write_text("layer 1's own\n")
    (tree / "l1.txt").write_text("from layer 1\n")
    os.chmod(tree, 0o755)
    return tree


def apply_changes(merged: Path) -> None:
    (merged / "a" / "del.txt").unlink()                         # whiteout of a file
    sh("rm", "-rf", str(merged / "b"))                          # whiteout of a dir ...
    (merged / "b").mkdir()                                      # ... recreated: opaque
    (merged / "b" / "new.txt").write_text("new in b\n")
    with open(merged / "c" / "mod.txt", "a") as f:               # copy-up + modify (xattr kept)
        f.write("modified\n")
    os.chmod(merged / "c" / "perm.txt", 0o4750)                 # mode incl. setuid
    os.chown(merged / "c" / "owner.txt", 1234, 5678)
    (merged / "newdir").mkdir(mode=0o700)
    (merged / "newdir" / "x").write_text("x\n")
    os.link(merged / "newdir" / "x", merged / "newdir" / "hl")    # new hard link
    os.setxattr(merged / "newdir" / "x", "user.note", b"binary\x01value")
    (merged / "newdir" / "big.bin").write_bytes(os.urandom(1 << 20))
    os.symlink("c/mod.txt", merged / "newlink")
    os.mkfifo(merged / "newdir" / "fifo")
    sh("rm", "-rf", str(merged / "gone-dir"))
    (merged / "l1.txt").unlink()                                # whiteout of a layer-1 file
    (merged / "opq" / "o3").write_text("added on top\n")


def manifest(root: Path) -> Manifest:
    """path -> (type, mode, uid, gid, size, sha256, symlink target, xattrs); root left out."""
    entries: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = size = target = None
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            names = os.listxattr(path, follow_symlinks=False)
            # overlayfs bookkeeping is not content; squashfuse 0.1.105 lists trusted.* as security.*
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names
                                  if not n.startswith(("trusted.overlay.", "security.overlay."))))
            entries[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                                     st.st_gid, size, digest, target, xattrs)
    return entries


def overlay_view_and_change(image: Path, work: Path) -> Manifest:
    """Mount layers (squashfuse) + the ext3 overlay (kernel, loop at its offset) + kernel
    overlayfs, make the changes through it, and record the merged tree."""
    from sifoverlay import ext3

    with open_image(image) as img:
        offsets = [layer.offset for layer in img.layers if img.overlay is None or layer.offset != img.overlay.offset]
        assert img.overlay is not None
        region = (img.overlay.offset, img.overlay.size)
    with ExitStack() as stack:
        lowers = [stack.enter_context(fuse_daemon(["squashfuse", "-f", "-o", f"ro,offset={off}", str(image)], work / f"l{i}"))
                  for i, off in enumerate(offsets)]
        device = stack.enter_context(ext3.loop_device(image, *region))
        upper_fs = stack.enter_context(mounted("mount", "-t", "ext3", device, target=work / "ext3"))
        lowerdir = ":".join(str(p) for p in reversed(lowers))  # top layer first
        opts = f"lowerdir={lowerdir},upperdir={upper_fs}/upper,workdir={upper_fs}/work"
        merged = stack.enter_context(mounted("mount", "-t", "overlay", "overlay", "-o", opts, target=work / "merged"))
        apply_changes(merged)
        os.sync()
        return manifest(merged)


def test_tar_push_unpacks_to_the_overlay_view(tmp_path: Path, registry: Registry) -> None:
    require_root()
    require_tool("squashfuse", "fuse2fs", "mksquashfs", "skopeo", "umoci", "losetup", "mount", "umount")
    layers = [squashfs_from(lower0(tmp_path / "t0"), tmp_path / "l0.sqfs"),
              squashfs_from(lower1(tmp_path / "t1"), tmp_path / "l1.sqfs")]
    image = build_ocisif(layers, tmp_path / "img.oci.sif")
    expected = overlay_view_and_change(image, tmp_path)
    # sanity of the view itself: the conventions did what they should
    assert "w/gone.txt" not in expected and "opq/o1" not in expected and "b/old0.txt" not in expected
    assert {"opq/o2", "opq/o3", "b/new.txt", "newdir/hl", "c/hl2"} <= expected.keys()

    ref = f"docker://{registry.host}/tar/overlay:v1"
    proc = run_cli("push", str(image), ref, "--layer-format", "tar", "--plain-http", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["sync"]["action"] == "reconciled"  # the kernel mount changed the overlay
    assert [l["source"] for l in result["layers"]] == ["squashfs", "squashfs", "overlay"]
    assert all(l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip" for l in result["layers"])

    layout = tmp_path / "pulled"
    sh("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{registry.host}/tar/overlay:v1",
       f"oci:{layout}:v1")
    sh("umoci", "unpack", "--image", f"{layout}:v1", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle" / "rootfs"
    actual = manifest(rootfs)
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    differ = {k: (expected[k], actual[k]) for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]}
    assert not (missing or extra or differ), f"missing={missing} extra={extra} differ={list(differ.items())[:4]}"
    # hard links stay hard links (new ones from the upper, old ones from the lower layer)
    for a, b in (("newdir/x", "newdir/hl"), ("c/hl1", "c/hl2")):
        assert os.lstat(rootfs / a).st_ino == os.lstat(rootfs / b).st_ino
    # the config's diff_ids are the tars' sha256 (umoci/skopeo verified the blobs already)
    config = json.loads(sh("skopeo", "inspect", "--config", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/tar/overlay:v1").stdout)
    assert config["rootfs"]["diff_ids"] == [l["diff_id"] for l in result["layers"]]
    assert len(config["history"]) == 3


def test_tar_push_is_deterministic(tmp_path: Path, registry: Registry, small_image: Path) -> None:
    require_root()
    require_tool("squashfuse", "fuse2fs")
    from .conftest import sha256_file

    before = sha256_file(small_image)
    ref = f"docker://{registry.host}/tar/det"
    first = run_cli("push", str(small_image), f"{ref}:a", "--layer-format", "tar", "--plain-http", "--json")
    second = run_cli("push", str(small_image), f"{ref}:b", "--layer-format", "tar", "--plain-http", "--json")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["manifest"] == b["manifest"]
    assert [l["digest"] for l in a["layers"]] == [l["digest"] for l in b["layers"]]
    assert sha256_file(small_image) == before  # fuse2fs -o ro and sqfs2tar only read
