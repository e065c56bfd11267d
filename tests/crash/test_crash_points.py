"""Every write point of create, sync and seal - from a clean, a dirty (ext3 journal needing
replay) and an unclean (interrupted seal) start - and of recovery itself: a real SIGKILL of
a separate process at each sampled op, recovery cut at its own ops (nested pairs), and the
power-loss models (drop, keep, subsets, 512/4096-byte torn writes). After recovery the
image equals the old or the new file of an uninterrupted run byte for byte (holes too),
or a named state whose justification the scenario states (tests/crash/harness.py).

The default run samples with a fixed seed (CRASH_SEED, default 16) to stay within a few
minutes on two cores; bench/crash_exhaustive.py runs every point and every pair. A
failure names the one command that replays it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.crash import harness, scenarios

pytestmark = [pytest.mark.crash, pytest.mark.slow]

# Sampling of the default run (fractions of the cut points; K draws per random model).
CI_PLANS = {
    "create": harness.Plan(kill_fraction=0.4, power_fraction=0.25, k=2, nested_fraction=0.3, nested_points_fraction=0.25),
    "sync": harness.Plan(kill_fraction=0.8, power_fraction=0.6, k=2, nested_fraction=0.6, nested_points_fraction=0.4),
    "seal": harness.Plan(kill_fraction=0.4, power_fraction=0.3, k=2, nested_fraction=0.3, nested_points_fraction=0.25),
    "sync-dirty": harness.Plan(kill_fraction=0.5, power_fraction=0.4, k=2, nested_fraction=0.4, nested_points_fraction=0.3),
    "seal-dirty": harness.Plan(kill_fraction=0.3, power_fraction=0.2, k=2, nested_fraction=0.3, nested_points_fraction=0.3),
    "seal-unclean": harness.Plan(kill_fraction=0.2, power_fraction=0.15, k=2, nested_fraction=0.3, nested_points_fraction=0.3),
    "resize": harness.Plan(kill_fraction=0.4, power_fraction=0.3, k=2, nested_fraction=0.3, nested_points_fraction=0.25),
    "compact": harness.Plan(kill_fraction=0.8, power_fraction=0.6, k=2, nested_fraction=0.6, nested_points_fraction=0.4),
}


@pytest.mark.parametrize("name", scenarios.NAMES)
def test_crash_points(name: str) -> None:
    if name in scenarios.ROOT_ONLY and os.geteuid() != 0:
        pytest.skip(f"{name}: making a dirty ext3 needs a kernel rw mount through a loop device (root)")
    base = harness.base_dir()
    before = {k: (v if not isinstance(v, (list, dict)) else len(v)) for k, v in harness.TOTALS.items()}
    start = time.monotonic()
    try:
        with harness.scenario_env(base):
            s = scenarios.make(name, base)
            counts = harness.run_scenario(s, CI_PLANS[name])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    failures = harness.TOTALS["failures"][int(before["failures"]):]  # type: ignore[index, call-overload]
    print(f"\n{name}: {counts} in {time.monotonic() - start:.1f} s; seed {harness.BASE_SEED};"
          f" named states: {s.justified}")
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:20])
    assert int(harness.TOTALS["old"]) > int(before["old"]) or name == "seal-unclean"  # type: ignore[call-overload]
    assert int(harness.TOTALS["new"]) > int(before["new"])  # type: ignore[call-overload]


def test_killed_create_leaves_its_mkfs_staging_dir_and_the_next_create_removes_it() -> None:
    """A real kill inside make_overlay_fs leaves <tmp>/.sifoverlay-mkfs-<host>-<pid>-* (no
    cleanup runs); `recover` restores the image, and the next create removes the dead
    process's staging dir before making its own."""
    import tempfile

    from sifoverlay.ext3.mkfs import STAGING_PREFIX

    base = harness.base_dir()
    try:
        with harness.scenario_env(base):
            s = scenarios.make("create", base)
            at = next(i for i, (op, info) in enumerate(s.log) if op == "chmod") + 2  # inside the staging dir build
            s.restore()
            pid = harness.kill_at(s, at, lambda io: s.run(s.image, s.journal, io))
            tmp = Path(tempfile.gettempdir())
            left = [p for p in tmp.iterdir() if p.name.startswith(STAGING_PREFIX) and f"-{pid}-" in p.name]
            assert len(left) == 1 and left[0].is_dir(), left
            assert harness.judge(s, harness.Case("create", "kill", at)) == "old"
            s.run(s.image, s.journal, harness.HarnessIO(tools=s.tools))
            assert not left[0].exists()
            assert harness.crashsim.file_id(str(s.image)) == s.new_id
    finally:
        shutil.rmtree(base, ignore_errors=True)
