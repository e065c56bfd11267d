"""Fixtures for the engine tests: real OCI-SIF files (the Go-written golden, or busybox-static
imported here without the conformance set: tests/conftest.py engine_base_source), real 64 MiB
sparse ext3 overlays made by the engine, modifications through e2fsprogs, the kernel
and fuse2fs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ENGINE_BASE_GOLDEN, engine_base_source, require_root, require_tool

GOLDEN = ENGINE_BASE_GOLDEN  # for older callers: the base image is engine_base_source()


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check, **kw)  # type: ignore[call-overload]


@pytest.fixture(autouse=True)
def journal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own journal directory (never the user's)."""
    path = tmp_path / "journal"
    monkeypatch.setenv("SIFOVERLAY_JOURNAL_DIR", str(path))
    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))  # lease records (engine/statedir.py)
    return path


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    path = tmp_path / "img" / "image.sif"
    path.parent.mkdir()
    shutil.copyfile(engine_base_source(), path)
    return path


@pytest.fixture
def overlay_image(base_image: Path) -> Path:
    require_tool("mkfs.ext3")
    from sifoverlay import engine

    engine.create_overlay(base_image, size_mib=64, sparse=True)
    return base_image


def region(path: Path) -> tuple[int, int]:
    from sifoverlay.ocisif import open_image

    with open_image(path) as img:
        assert img.overlay is not None
        return img.overlay.offset, img.overlay.size


def sha256_range(path: Path, offset: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left:
            chunk = f.read(min(left, 4 << 20))
            assert chunk
            h.update(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def debugfs_write(image: Path, source: Path, dest: str) -> None:
    """Write a file into the overlay with e2fsprogs (changes wtime/kbytes_written)."""
    require_tool("debugfs")
    offset, _ = region(image)
    sh("debugfs", "-w", "-R", f"write {source} {dest}", f"{image}?offset={offset}")


def debugfs_cat(image: Path, path: str) -> bytes:
    offset, _ = region(image)
    return subprocess.run(["debugfs", "-R", f"cat {path}", f"{image}?offset={offset}"],
                          capture_output=True, check=True).stdout


def modify_overlay(image: Path, tmp: Path, content: bytes = b"hello overlay\n", name: str = "upper/hello") -> None:
    src = tmp / f"payload-{hashlib.sha256(content).hexdigest()[:8]}"
    src.write_bytes(content)
    debugfs_write(image, src, name)


@contextmanager
def kernel_rw_mount(image: Path, mountpoint: Path) -> Iterator[tuple[Path, str]]:
    """Kernel ext3 rw mount of the overlay through a loop device at its unaligned offset."""
    require_root()
    require_tool("losetup", "mount", "umount")
    from sifoverlay import ext3

    offset, size = region(image)
    mountpoint.mkdir(exist_ok=True)
    with ext3.loop_device(image, offset, size) as dev:
        sh("mount", "-t", "ext3", dev, str(mountpoint))
        try:
            yield mountpoint, dev
        finally:
            sh("umount", str(mountpoint))


def used_sif_objects(path: Path) -> list[tuple[int, int, int, str | None]]:
    from sifoverlay.sif.load import SifFile

    with SifFile.open(path) as sif:
        return [(d.id, d.offset, d.size, d.digest) for d in sif.used()]


def assert_consistent(path: Path) -> None:
    """I1 + the sync result contract: loads; one root index; every referenced blob
    hashes to its digest; overlay digest == descriptor == last diff_id == bytes;
    DataSize == end of the furthest object == file length; DescriptorsFree exact."""
    from sifoverlay.ocisif import open_image
    from sifoverlay.ocisif.model import iter_refs
    from sifoverlay.sif.constants import DataType

    with open_image(path) as img:
        sif = img.sif
        used = sif.used()
        assert sum(1 for d in used if d.datatype == DataType.OCI_ROOT_INDEX) == 1
        for ref in iter_refs(sif):
            desc = img.blob(ref.digest)
            assert sha256_range(path, desc.offset, desc.size) == ref.digest, ref
        end = max(d.end for d in used)
        assert sif.header.data_offset + sif.header.data_size == end
        assert os.path.getsize(path) == end
        assert sif.header.descriptors_free == sum(1 for d in sif.descriptors if not d.is_used)
        if img.overlay is not None:
            assert img.overlay.descriptor.digest == img.overlay.recorded_digest
            assert img.config.json["rootfs"]["diff_ids"][-1] == img.overlay.recorded_digest
            assert img.manifest.json["layers"][-1]["digest"] == img.overlay.recorded_digest
