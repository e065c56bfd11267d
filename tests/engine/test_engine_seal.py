"""overlay seal: upper/ becomes a squashfs layer replacing the ext3; both whiteout styles."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.errors import ImageBusy, OverlayStateError
from sifoverlay.ocisif import OVERLAY_FINGERPRINT_ANNOTATION, mediatypes, open_image
from tests.conftest import require_root, require_tool
from tests.engine.conftest import assert_consistent, kernel_rw_mount, modify_overlay, region, sh, sha256_range


def _last_layer(image: Path, out: Path) -> Path:
    """Copy the image's last layer (the sealed squashfs) into the file `out`."""
    with open_image(image) as img:
        layer = img.layers[-1]
        with open(image, "rb") as f:
            f.seek(layer.descriptor.offset)
            out.write_bytes(f.read(layer.size))
    return out


def _listing(image: Path, tmp: Path) -> dict[str, str]:
    """path -> `ls -l` type/mode column of the sealed squashfs layer (unsquashfs -lls)."""
    raw = _last_layer(image, tmp / "layer.sqfs")
    out = sh("unsquashfs", "-lls", "-d", "", str(raw)).stdout
    entries = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0][0] in "-dcbl":
            entries[parts[-1] if parts[0][0] != "l" else parts[-3]] = parts[0] + (" " + parts[2] if parts[0][0] == "c" else "")
    return entries


def test_seal_replaces_the_ext3_layer(overlay_image: Path, tmp_path: Path) -> None:
    require_tool("fuse2fs", "tar2sqfs", "unsquashfs", "debugfs")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    modify_overlay(overlay_image, tmp_path, b"kept\n", name="upper/kept.txt")
    modify_overlay(overlay_image, tmp_path, b"", name="upper/.wh.gone")  # fuse-overlayfs whiteout
    offset, size = region(overlay_image)
    with open_image(overlay_image) as img:
        old_layers = [(layer.media_type, layer.digest) for layer in img.layers[:-1]]
        old_diff_ids = img.config.json["rootfs"]["diff_ids"][:-1]
    result = engine.seal(overlay_image)
    assert result.action == "sealed"
    assert_consistent(overlay_image)
    with open_image(overlay_image) as img:
        assert img.overlay is None
        assert [(layer.media_type, layer.digest) for layer in img.layers[:-1]] == old_layers
        last = img.manifest.json["layers"][-1]
        assert last["mediaType"] == mediatypes.SQUASHFS_LAYER
        assert OVERLAY_FINGERPRINT_ANNOTATION not in (last.get("annotations") or {})
        assert last["digest"] == result.layer_digest == img.config.json["rootfs"]["diff_ids"][-1]
        assert img.config.json["rootfs"]["diff_ids"][:-1] == old_diff_ids
        layer = img.layers[-1]
        assert sha256_range(overlay_image, layer.descriptor.offset, layer.size) == layer.digest
    with open(overlay_image, "rb") as f:  # the freed ext3 range reads as zeros (punched)
        f.seek(offset)
        assert f.read(1 << 20) == bytes(1 << 20)
    listing = _listing(overlay_image, tmp_path)
    assert listing["/kept.txt"].startswith("-")
    assert listing["/gone"].startswith("c")  # .wh.gone became an overlayfs whiteout
    assert "/.wh.gone" not in listing
    with pytest.raises(OverlayStateError, match="does not contain a writable overlay"):
        engine.sync(overlay_image)
    with pytest.raises(OverlayStateError, match="does not contain a writable overlay"):
        engine.seal(overlay_image)
    assert sorted(os.listdir(overlay_image.parent)) == [overlay_image.name]


@pytest.mark.root
def test_seal_kernel_overlayfs_upper_strips_origin_xattrs(overlay_image: Path, tmp_path: Path) -> None:
    require_root()
    require_tool("fuse2fs", "tar2sqfs", "unsquashfs", "getfattr")
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "dir" / "old.txt").write_text("lower\n")
    (lower / "doomed.txt").write_text("doomed\n")
    with kernel_rw_mount(overlay_image, tmp_path / "ext3") as (ext3_mnt, _dev):
        merged = tmp_path / "merged"
        merged.mkdir()
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={lower},upperdir={ext3_mnt}/upper,workdir={ext3_mnt}/work", str(merged))
        try:
            (merged / "doomed.txt").unlink()  # char 0:0 whiteout in upper
            (merged / "dir" / "old.txt").write_text("changed\n")  # copy-up: origin xattrs
        finally:
            sh("umount", str(merged))
    engine.sync(overlay_image)
    engine.seal(overlay_image)
    assert_consistent(overlay_image)
    listing = _listing(overlay_image, tmp_path)
    assert listing["/doomed.txt"].startswith("c")
    assert listing["/dir/old.txt"].startswith("-")
    raw = _last_layer(overlay_image, tmp_path / "check.sqfs")
    extracted = tmp_path / "extracted"
    sh("unsquashfs", "-d", str(extracted), str(raw))
    attrs = subprocess.run(["getfattr", "-R", "-d", "-m", "-", str(extracted)], capture_output=True, text=True).stdout
    assert "trusted.overlay.origin" not in attrs and "trusted.overlay.impure" not in attrs
    assert (extracted / "dir" / "old.txt").read_text() == "changed\n"


def test_seal_refuses_while_the_overlay_is_mounted(overlay_image: Path, tmp_path: Path) -> None:
    require_root()
    require_tool("fuse2fs", "fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    offset, _ = region(overlay_image)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    sh("fuse2fs", "-o", f"ro,offset={offset}", str(overlay_image), str(mnt))
    try:
        before = overlay_image.read_bytes()
        with pytest.raises(ImageBusy, match="overlay in use"):
            engine.seal(overlay_image)  # even a read-only user: the ext3 bytes go away
        assert overlay_image.read_bytes() == before
    finally:
        sh("fusermount3", "-u", str(mnt), check=False)
