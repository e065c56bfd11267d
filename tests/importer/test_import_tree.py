"""Imported layers, loop-mounted at their SIF offsets and stacked with kernel overlayfs,
show exactly the tree that applying the source layers with OCI whiteout rules gives."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sifoverlay.ocisif import open_image
from sifoverlay.ocisif import mediatypes as mt
from sifoverlay.ocisif.importer import import_image
from sifoverlay.sif.load import SifFile

from tests.conftest import require_root, require_tool
from .conftest import LAYOUT_VECTORS, LIST_VECTORS
from .reftree import (
    entry,
    layout_layers,
    make_tar,
    mounted_stack,
    reference_snapshot,
    snapshot_dir,
    write_layout,
)

pytestmark = pytest.mark.root


def _needs_mounts() -> None:
    require_root()
    require_tool("losetup", "mount", "umount", "tar2sqfs", "sqfs2tar")


def _imported_view(out: Path, expected_layers: int) -> tuple[tuple, list[dict]]:
    """Open the OCI-SIF, check its layer graph, mount the stack, snapshot the merged view."""
    with open_image(out) as image:
        assert len(image.layers) == expected_layers
        assert all(layer.media_type == mt.SQUASHFS_LAYER for layer in image.layers)
        assert image.config.json["rootfs"]["diff_ids"] == [layer.digest for layer in image.layers]
        image.verify_layers()
        ranges = [(layer.offset, layer.size) for layer in image.layers]
        layers = [{"digest": l.digest, "size": l.size, "offset": l.offset} for l in image.layers]
    with mounted_stack(out, ranges) as merged:
        return snapshot_dir(merged), layers


@pytest.mark.parametrize("squash", [False, True], ids=["layers", "squash"])
@pytest.mark.parametrize("name", LAYOUT_VECTORS)
def test_layout_vector_tree(name: str, squash: bool, layouts: Path, tmp_path: Path) -> None:
    _needs_mounts()
    source = layouts / name
    platform = "linux/amd64" if name in LIST_VECTORS else None
    out = tmp_path / "out.oci.sif"
    result = import_image(source, out, platform=platform, squash=squash)
    source_layers = layout_layers(source, arch="amd64")
    expected = reference_snapshot(source_layers)
    view, layers = _imported_view(out, 1 if squash else len(source_layers))
    assert view == expected
    assert [l["digest"] for l in layers] == [l.digest for l in result.layers]
    if not squash:
        for (media_type, blob), layer in zip(source_layers, result.layers):
            if media_type == mt.SQUASHFS_LAYER:  # squashfs layers pass through untouched
                assert layer.digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()


def test_vector_list_is_complete(layouts: Path) -> None:
    from .conftest import BROKEN_VECTORS

    present = {p.name for p in layouts.iterdir() if (p / "index.json").is_file()}
    assert present == set(LAYOUT_VECTORS) | set(BROKEN_VECTORS)


def _readdress(src: Path, dst: Path) -> Path:
    """Copy a layout, store every blob under its true digest and fix the references
    (the aufs vector's config and layer are stored under wrong digests)."""
    shutil.copytree(src, dst)
    blobs = dst / "blobs" / "sha256"
    index = json.loads((dst / "index.json").read_bytes())
    manifest_path = blobs / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_bytes())

    def put(raw: bytes) -> dict:
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return {"size": len(raw), "digest": f"sha256:{digest}"}

    layer_raw = (blobs / manifest["layers"][0]["digest"].split(":")[1]).read_bytes()
    import gzip

    manifest["layers"][0].update(put(layer_raw))
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config["rootfs"]["diff_ids"] = ["sha256:" + hashlib.sha256(gzip.decompress(layer_raw)).hexdigest()]
    manifest["config"].update(put(json.dumps(config).encode()))
    index["manifests"][0].update(put(json.dumps(manifest).encode()))
    (dst / "index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("squash", [False, True], ids=["layers", "squash"])
def test_aufs_vector_readdressed(squash: bool, layouts: Path, tmp_path: Path) -> None:
    """The AUFS-whiteout vector (root entry owned by 1001, opaque dir, file whiteout)."""
    _needs_mounts()
    source = _readdress(layouts / "aufs-docker-v2-manifest", tmp_path / "layout")
    out = tmp_path / "out.oci.sif"
    import_image(source, out, squash=squash)
    expected = reference_snapshot(layout_layers(source))
    view, _ = _imported_view(out, 1)
    assert view == expected
    assert view[0][""][2:4] == (1001, 1001)  # the layer's own root entry wins


def _crafted_layout(root: Path) -> Path:
    """Cases the vectors lack: implicit parents that must keep their lower attributes,
    hard links into lower layers (whole link group), symlinks, xattrs, fifos, an opaque
    marker in a directory without its own entry, a dir replaced by a file and back."""
    l0 = make_tar([
        (entry("etc", "dir", mode=0o750, uid=7, gid=8), None),
        (entry("etc/conf", mode=0o600, uid=7, gid=8, xattrs={"user.tag": "base"}), b"base config\n"),
        (entry("etc/alias", "hardlink", link="etc/conf"), None),
        (entry("etc/link", "symlink", link="conf"), None),
        (entry("data", "dir", mode=0o1777), None),
        (entry("data/old", mode=0o644), b"old\n"),
        (entry("data/keep", mode=0o644), b"keep\n"),
        (entry("swap", "dir", mode=0o700), None),
        (entry("swap/inner"), b"inner\n"),
        (entry("pipe", "fifo", mode=0o600), None),
        (entry("h", "dir"), None),
        (entry("h/a", mode=0o444), b"A\n"),
        (entry("h/b", "hardlink", link="h/a"), None),
    ])
    l1 = make_tar([
        (entry("etc/new", mode=0o640, uid=3), b"new\n"),  # no etc/ entry: etc keeps 0750 7:8
        (entry("etc/third", "hardlink", link="etc/alias"), None),  # joins the lower link group
        (entry("data/.wh..wh..opq"), b""),  # opaque without a data/ entry
        (entry("data/fresh"), b"fresh\n"),
        (entry(".wh.swap"), b""),
        (entry("swap"), b"now a file\n"),
        (entry("ghost/.wh.nothing"), b""),  # hides nothing: must not create ghost/
        (entry("phantom/.wh..wh..opq"), b""),  # same for an opaque marker
        (entry("dup", mode=0o600), b"first\n"),
        (entry("dup", mode=0o640), b"second wins\n"),
        (entry("h/x", "hardlink", link="h/a"), None),  # links the lower inode...
        (entry("h/a", mode=0o600), b"new A\n"),  # ...which h/a then leaves
    ])
    l2 = make_tar([
        (entry("etc/.wh.conf"), b""),  # alias and third stay linked together
        (entry("swap", "dir", mode=0o711, xattrs={"user.again": "1"}), None),
        (entry("bin", "dir"), None),
        (entry("bin/tool", mode=0o755), b"#!/bin/sh\n"),
    ])
    import gzip

    return write_layout(root, [{"layers": [
        ("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(l0, mtime=0)),
        ("application/vnd.oci.image.layer.v1.tar", l1),
        ("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(l2, mtime=0)),
    ]}])


@pytest.mark.parametrize("squash", [False, True], ids=["layers", "squash"])
def test_crafted_layout_tree(squash: bool, tmp_path: Path) -> None:
    _needs_mounts()
    source = _crafted_layout(tmp_path / "layout")
    out = tmp_path / "out.oci.sif"
    import_image(source, out, squash=squash)
    expected = reference_snapshot(layout_layers(source))
    entries, groups = expected
    # the reference itself says what the rules mean here
    assert entries["etc"][1:4] == ("0o750", 7, 8)
    assert groups == [["etc/alias", "etc/third"], ["h/b", "h/x"]]
    assert "data/old" not in entries and "data/fresh" in entries and "swap/inner" not in entries
    assert entries["swap"][0] == "dir" and entries["pipe"][0] == "fifo"
    assert "ghost" not in entries and "phantom" not in entries and entries["dup"][1] == "0o640"
    view, _ = _imported_view(out, 1 if squash else 3)
    assert view == expected


def test_busybox_native_sif_runs(busybox_sif: Path, tmp_path: Path) -> None:
    _needs_mounts()
    require_tool("chroot")
    out = tmp_path / "busybox.oci.sif"
    result = import_image(busybox_sif, out)
    with SifFile.open(busybox_sif) as sif:
        primary = next(d for d in sif.used() if d.is_primary_partition)
        partition = b"".join(sif.iter_chunks(primary))
        part_range = (primary.offset, primary.size)
    with open_image(out) as image:
        assert len(image.layers) == 1
        layer = image.layers[0]
        assert layer.media_type == mt.SQUASHFS_LAYER
        assert image.sif.read(layer.descriptor) == partition  # raw bytes as they are
        assert layer.digest == "sha256:" + hashlib.sha256(partition).hexdigest() == result.layers[0].digest
        config = image.config.json
        assert (config["architecture"], config["os"]) == ("amd64", "linux")
        assert config["rootfs"]["diff_ids"] == [layer.digest]
        ranges = [(layer.offset, layer.size)]
    with mounted_stack(busybox_sif, [part_range]) as direct:
        original = snapshot_dir(direct)
    with mounted_stack(out, ranges) as merged:
        assert snapshot_dir(merged) == original
        run = subprocess.run(["chroot", merged, "/bin/busybox", "true"], capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr
        echo = subprocess.run(["chroot", merged, "/bin/busybox", "echo", "from-busybox"], capture_output=True, timeout=60)
        assert echo.stdout == b"from-busybox\n"


def test_tar_layer_over_squashfs_layer(tmp_path: Path) -> None:
    """A squashfs layer passes through; a tar layer above it still gets its lower
    attributes and can hard-link into it (the squashfs tree is read back with sqfs2tar)."""
    _needs_mounts()
    base_tar = make_tar([
        (entry("./", "dir", mode=0o711, uid=5, gid=6), None),
        (entry("lib", "dir", mode=0o750, uid=2), None),
        (entry("lib/a.so", mode=0o755), b"library\n"),
        (entry("lib/b.so", "hardlink", link="lib/a.so"), None),
    ])
    squashfs = tmp_path / "base.sqfs"
    subprocess.run(["tar2sqfs", "-q", "-f", "-c", "gzip", str(squashfs)], input=base_tar, check=True)
    top = make_tar([
        (entry("lib/c.so", "hardlink", link="lib/b.so"), None),
        (entry("lib/.wh.a.so"), b""),
        (entry("bin/sh", mode=0o755), b"shell\n"),
    ])
    source = write_layout(tmp_path / "layout", [{"layers": [
        (mt.SQUASHFS_LAYER, squashfs.read_bytes()), ("application/vnd.oci.image.layer.v1.tar", top)]}])
    expected = reference_snapshot(layout_layers(source))
    assert expected[0][""][1:4] == ("0o711", 5, 6) and expected[1] == [["lib/b.so", "lib/c.so"]]
    for squash in (False, True):
        out = tmp_path / f"out{squash}.oci.sif"
        import_image(source, out, squash=squash)
        view, _ = _imported_view(out, 1 if squash else 2)
        assert view == expected


def test_layers_mount_with_squashfuse_at_their_offset(busybox_sif: Path, layouts: Path, tmp_path: Path) -> None:
    """How SingularityCE mounts OCI-SIF layers: squashfuse -o offset=N on the SIF itself."""
    require_tool("squashfuse", "fusermount")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse")
    out = tmp_path / "bb.oci.sif"
    import_image(busybox_sif, out)
    with open_image(out) as image:
        offset = image.layers[0].offset
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["squashfuse", "-o", f"offset={offset}", str(out), str(point)], check=True, timeout=60)
    try:
        assert (point / "bin" / "busybox").is_file()
        assert os.access(point / "bin" / "busybox", os.X_OK)
    finally:
        subprocess.run(["fusermount", "-u", str(point)], check=True, timeout=60)
