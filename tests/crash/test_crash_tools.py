"""SIGKILL of e2fsck (replaying a dirty ext3 journal) and tar2sqfs (writing the squashfs
of a seal) at their own write calls; see tests/crash/tools.py for what must hold."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.conftest import require_tool
from tests.crash import harness, scenarios, tools

pytestmark = [pytest.mark.crash, pytest.mark.slow]

CI_KILLS = 8  # sampled kill points per tool (fixed seed); bench/crash_exhaustive.py: all


def _points(points: list[tuple[str, int]], name: str, limit: int | None) -> list[tuple[str, int]]:
    if limit is None or len(points) <= limit:
        return points
    rng = random.Random(f"{harness.BASE_SEED}:{name}:tool")
    return [points[0], points[-1]] + rng.sample(points[1:-1], limit - 2)


def run_tool_kills(name: str, tool: str, limit: int | None) -> list[str]:
    base = harness.base_dir()
    try:
        with harness.scenario_env(base):
            s = scenarios.make(name, base)
            region = None
            if tool == "e2fsck":
                from tests.engine.conftest import region as overlay_region

                region = overlay_region(s.image)
            points = tools.count_writes(s, tool)
            assert len(points) >= 2, f"{tool} made {len(points)} {tools.WRAPPED_SYSCALL} calls"
            if tool == "e2fsck":  # both e2fsck itself and the write-back into the image are cut
                assert {w for w, _ in points} == {"tool", "write-back"}, points
            return [tools.kill_tool(s, tool, p, region) for p in _points(points, name, limit)]
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(("name", "tool"), [("sync-dirty", "e2fsck"), ("seal", "tar2sqfs")])
def test_kill_the_tool_mid_write(name: str, tool: str) -> None:
    require_tool("strace", tool)
    if name in scenarios.ROOT_ONLY and os.geteuid() != 0:
        pytest.skip(f"{name}: making a dirty ext3 needs a kernel rw mount through a loop device (root)")
    before = len(harness.TOTALS["failures"])  # type: ignore[arg-type]
    ends = run_tool_kills(name, tool, CI_KILLS)
    failures = harness.TOTALS["failures"][before:]  # type: ignore[index]
    assert not failures, "\n".join(failures)
    assert ends and set(ends) == {"new"}, ends
