"""Issue 18: the operator's reconcile records who changed the image (the workload, via the
operator) in the image's revision history."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sifoverlay.engine.history import read_log
from tests.conftest import require_tool


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIFOVERLAY_JOURNAL_DIR", str(tmp_path / "journal"))
    monkeypatch.setenv("SIFOVERLAY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_operator_reconcile_records_the_workload(tmp_path: Path) -> None:
    require_tool("mkfs.ext3", "debugfs")
    from sifoverlay import engine
    from sifoverlay.k8s import reconcile
    from tests.conftest import engine_base_source
    from tests.engine.conftest import modify_overlay

    image = tmp_path / "img" / "image.sif"
    image.parent.mkdir()
    image.write_bytes(engine_base_source().read_bytes())
    engine.create_overlay(image, sparse=True)
    modify_overlay(image, tmp_path, b"written by the pod\n")
    fd = os.open(image, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        out = reconcile.run(str(image), job_id="team-a/train-7", journal_dir=str(tmp_path / "journal"), seal=False,
                            image_fd=fd, expect_identity=(st.st_dev, st.st_ino))
    finally:
        os.close(fd)
    assert out.action == "reconciled"
    newest = read_log(image).newest_first()[0]
    assert newest["op"] == "sync" and newest["overlay"]["new"] == out.digest_after
    assert newest["who"]["job_id"] == "team-a/train-7" and newest["who"]["via"] == "operator"
    assert newest["who"]["uid"] == os.getuid() and newest["who"]["node"] == os.uname().nodename


def test_rw_workload_refused_at_admission_without_descriptor_slots_for_its_sync(
        site, cluster, vectors: Path, operator: object) -> None:  # type: ignore[no-untyped-def]
    """The operator's admission runs the same pre-flight as the Prolog: an image whose end-of-job
    sync could not commit (fewer than 4 free SIF descriptor slots) fails at once, nothing runs."""
    from tests.engine.test_engine_capacity import fill_slots

    image = site.make_image(vectors)
    fill_slots(image, 3)
    before = image.read_bytes()
    cluster.create_overlayjob("full")
    cluster.wait_phase("full", "Failed")
    failed = cluster.condition("full", "Failed")
    assert "only 3 free SIF descriptor slots, the sync at job end needs 4" in failed["message"], failed
    assert cluster.job("full-run") is None
    assert image.read_bytes() == before


@pytest.fixture
def min_free_site(site, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The site with the chart's operator.minFreeBytes set (1 TiB: more than any test overlay)."""
    monkeypatch.setenv("SIFOVERLAY_MIN_FREE_BYTES", str(1 << 40))
    return site


def test_rw_workload_refused_at_admission_below_the_minimum_free_space(
        min_free_site, cluster, vectors: Path, operator: object) -> None:  # type: ignore[no-untyped-def]
    """operator.minFreeBytes: a rw OverlayJob on an overlay with less space available fails at
    once with the Prolog's one line; nothing runs, the image is untouched."""
    image = min_free_site.make_image(vectors)
    before = image.read_bytes()
    cluster.create_overlayjob("tight")
    cluster.wait_phase("tight", "Failed")
    failed = cluster.condition("tight", "Failed")
    assert f"less than the required {1 << 40} (min_free)" in failed["message"], failed
    assert "grow it with `sifoverlay overlay resize`" in failed["message"], failed
    assert cluster.job("tight-run") is None
    assert image.read_bytes() == before
