"""Every write point of create, sync and seal (and of recovery itself): in-process crash,
real SIGKILL, power loss. After recovery the image is exactly old or new (I1-I5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.fsio import FileIO
from sifoverlay.ocisif import mediatypes, open_image
from tests.conftest import require_tool
from tests.crash import harness
from tests.engine.conftest import GOLDEN, modify_overlay

pytestmark = [pytest.mark.crash, pytest.mark.slow]

SUBPROCESS_SAMPLES = 8  # real-process kills per scenario (each costs an interpreter start)


def _sync(image: Path, journal: Path, io: FileIO) -> object:
    return engine.sync(image, journal_dir=journal, io=io)


def _create(image: Path, journal: Path, io: FileIO) -> object:
    return engine.create_overlay(image, size_mib=64, sparse=True, journal_dir=journal, io=io)


def _seal(image: Path, journal: Path, io: FileIO) -> object:
    return engine.seal(image, journal_dir=journal, io=io)


def _sync_new_state(reference: bytes) -> object:
    def check(image: Path, checker: harness.Checker) -> bool:
        with open_image(image) as img:
            same_meta = img.sif.metadata_bytes() == reference
            overlay = img.overlay
            assert overlay is not None and (overlay.offset, overlay.size) == checker.old_overlay
            assert harness.content_id(image, overlay.offset, overlay.size) == checker.old_overlay_id  # I3
            assert overlay.recorded_digest == checker.old_overlay_sha  # = sha256 of those same bytes
        return same_meta

    return check


def _create_new_state(image: Path, checker: harness.Checker) -> bool:
    with open_image(image) as img:
        assert [(l.media_type, l.digest, l.size) for l in img.layers[:-1]] == checker.old_layers
        overlay = img.overlay
        assert overlay is not None and overlay.size == 64 << 20
        assert harness.sha_range(image, overlay.offset, overlay.size) == overlay.recorded_digest
        assert img.config.json["rootfs"]["diff_ids"][-1] == overlay.recorded_digest
    return True


def _seal_new_state(image: Path, checker: harness.Checker) -> bool:
    with open_image(image) as img:
        assert img.overlay is None
        assert [(l.media_type, l.digest, l.size) for l in img.layers[:-1]] == checker.old_layers[:-1]
        last = img.layers[-1]
        assert last.media_type == mediatypes.SQUASHFS_LAYER
        assert harness.sha_range(image, last.descriptor.offset, last.size) == last.digest
    return True


def _run_all(scenario: harness.Scenario, checker: harness.Checker, repo: Path, *, nested: bool = True) -> None:
    total, log = harness.count_ops(scenario)
    assert total > 10
    a = harness.in_process(scenario, checker, total, nested=nested, log_ops=[op for op, _ in log])
    assert a["old"] >= 1 and a["new"] >= 1, a  # both outcomes are reached
    step = max(1, total // SUBPROCESS_SAMPLES)
    points = sorted(set(range(1, total + 1, step)) | {total})
    harness.real_process(scenario, checker, points, repo)
    for mode in ("drop", "torn"):
        c = harness.power_loss(scenario, checker, log, mode)
        assert c["old"] >= 1, c


@pytest.fixture
def sync_scenario(workdir: Path, vectors: Path, tmp_path: Path) -> tuple[harness.Scenario, harness.Checker]:
    require_tool("mkfs.ext3", "debugfs")
    image = workdir / "img" / "image.sif"
    shutil.copyfile(vectors / GOLDEN, image)
    engine.create_overlay(image, sparse=True, journal_dir=workdir / "journal")
    modify_overlay(image, tmp_path, b"written by the job\n")
    reference_dir = tmp_path / "reference"
    shutil.copytree(workdir, reference_dir)
    engine.sync(reference_dir / "img" / "image.sif", journal_dir=reference_dir / "journal")
    with open_image(reference_dir / "img" / "image.sif") as img:
        reference = img.sif.metadata_bytes()
    scenario = harness.Scenario("sync", workdir, _sync, ["overlay", "sync"], _sync_new_state(reference))
    scenario.freeze()
    return scenario, harness.Checker(scenario)


def test_crash_every_point_of_sync(sync_scenario: tuple[harness.Scenario, harness.Checker], repo_root: Path) -> None:
    scenario, checker = sync_scenario
    _run_all(scenario, checker, repo_root)


def test_crash_every_point_of_create(workdir: Path, vectors: Path, repo_root: Path) -> None:
    require_tool("mkfs.ext3")
    shutil.copyfile(vectors / GOLDEN, workdir / "img" / "image.sif")
    scenario = harness.Scenario("create", workdir, _create, ["overlay", "create", "--sparse"], _create_new_state)
    scenario.freeze()
    _run_all(scenario, harness.Checker(scenario), repo_root)


def test_crash_every_point_of_seal(workdir: Path, vectors: Path, tmp_path: Path, repo_root: Path) -> None:
    require_tool("mkfs.ext3", "debugfs", "fuse2fs", "mksquashfs")
    pytest.importorskip("sifoverlay.upper", reason="sifoverlay.upper (helper-4) not available yet")
    image = workdir / "img" / "image.sif"
    shutil.copyfile(vectors / GOLDEN, image)
    engine.create_overlay(image, sparse=True, journal_dir=workdir / "journal")
    modify_overlay(image, tmp_path, b"sealed content\n")
    engine.sync(image, journal_dir=workdir / "journal")
    scenario = harness.Scenario("seal", workdir, _seal, ["overlay", "seal"], _seal_new_state)
    scenario.freeze()
    _run_all(scenario, harness.Checker(scenario), repo_root, nested=False)
