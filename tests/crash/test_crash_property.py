"""Property tier: random interleavings of job writes, syncs, crashes at random write
points and recoveries; after every step the image loads, every referenced blob but the
(legitimately stale) overlay hashes to its digest, and sync/recovery never change the
overlay's bytes. After a completed sync the overlay is clean."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sifoverlay import engine
from sifoverlay.fsio import CountingIO, SimulatedCrash
from tests.conftest import engine_base_source, require_tool
from tests.crash import harness
from tests.engine.conftest import debugfs_write, region

pytestmark = [pytest.mark.crash, pytest.mark.slow]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("sync"), st.just(b"")),
        st.tuples(st.just("crash-sync"), st.integers(min_value=1, max_value=40).map(lambda n: n.to_bytes(1, "big"))),
    ),
    min_size=1,
    max_size=6,
)


def _blobs_intact(image: Path) -> None:
    from sifoverlay.ocisif import open_image
    from sifoverlay.ocisif.model import iter_refs

    with open_image(image) as img:
        for ref in iter_refs(img.sif):
            desc = img.blob(ref.digest)
            if img.overlay is not None and desc == img.overlay.descriptor:
                continue
            assert harness.sha_range(image, desc.offset, desc.size) == ref.digest


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_random_interleavings_keep_invariants(plan: list[tuple[str, bytes]]) -> None:
    require_tool("mkfs.ext3", "debugfs")
    base = Path(tempfile.mkdtemp(prefix="sifoverlay-prop-"))
    try:
        with harness.scenario_env(base):  # lease records in base/work/state
            _interleave(base, plan)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _interleave(base: Path, plan: list[tuple[str, bytes]]) -> None:
    if True:
        (base / "img").mkdir()
        image = base / "img" / "image.sif"
        journal = base / "journal"
        shutil.copyfile(engine_base_source(), image)
        engine.create_overlay(image, sparse=True, journal_dir=journal)
        for n, (action, arg) in enumerate(plan):
            offset, size = region(image)
            if action == "write":
                src = base / f"w{n}"
                src.write_bytes(arg)
                debugfs_write(image, src, f"upper/w{n}")
                continue
            overlay_before = harness.content_id(image, offset, size)
            if action == "sync":
                engine.sync(image, journal_dir=journal)
                assert engine.status(image, verify=True, journal_dir=journal).state == "clean"
            else:
                fds = harness.open_fds()
                try:
                    engine.sync(image, journal_dir=journal, io=CountingIO(arg[0]))
                except SimulatedCrash:
                    pass
                harness.close_leaked_fds(fds, base)
                harness.drop_leases(base)
                outcomes = engine.recover([str(image)], journal_dir=journal)
                assert all(o.outcome != "failed" for o in outcomes), outcomes
            assert region(image) == (offset, size)
            assert harness.content_id(image, offset, size) == overlay_before
            _blobs_intact(image)
            assert engine.recover(journal_dir=journal) == []
