"""Capacity metrics (issue 18): free inodes and free descriptor slots per image, and the
newest revision's sequence number, as the exporter scrapes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.ext3 import Superblock
from sifoverlay.metrics import scan
from sifoverlay.metrics.scan import Scanner
from sifoverlay.ocisif import open_image
from sifoverlay.sif.load import SifFile
from tests.metrics.conftest import write_with_debugfs
from tests.metrics.test_scan import _collect


@pytest.fixture(autouse=True)
def no_mount_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # the node's FUSE daemons are not this test's business (and a frozen one blocks stat)
    monkeypatch.setattr(scan, "mounted_files", lambda *a, **k: set())


def _expected(image: Path) -> tuple[int, int, int]:
    with open_image(image) as img:
        overlay = img.overlay
        assert overlay is not None
        sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
        inodes, free_bytes = sb.free_inodes, sb.free_bytes
    with SifFile.open(image) as sif:
        slots = sum(1 for d in sif.descriptors if not d.is_used)
    return inodes, slots, free_bytes


def test_free_inodes_descriptors_and_revisions(image: Path, tmp_path: Path) -> None:
    scanner = Scanner([str(image)])
    got = _collect(scanner)
    key = (("image", str(image)),)
    inodes, slots, free_bytes = _expected(image)
    assert got[("sifoverlay_overlay_free_inodes", key)] == inodes
    assert got[("sifoverlay_sif_free_descriptors", key)] == slots
    assert got[("sifoverlay_overlay_free_bytes", key)] == free_bytes
    first = got[("sifoverlay_image_revisions_total", key)]
    assert first >= 1  # the overlay's create
    write_with_debugfs(image, tmp_path, "upper/one", b"1\n")
    write_with_debugfs(image, tmp_path, "upper/two", b"2\n")
    engine.sync(image)
    got = _collect(scanner)
    inodes2, slots2, _ = _expected(image)
    assert inodes2 == inodes - 2
    assert got[("sifoverlay_overlay_free_inodes", key)] == inodes2
    assert got[("sifoverlay_sif_free_descriptors", key)] == slots2 == slots
    assert got[("sifoverlay_image_revisions_total", key)] == first + 1
