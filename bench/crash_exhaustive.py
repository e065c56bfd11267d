#!/usr/bin/env python3
"""Exhaustive crash run (issue 16): every cut point of every scenario as a real SIGKILL of
a separate process, every power-loss model at every cut point (K draws of the random
ones), recovery crossed with itself (sync: every kill point x every recovery cut point;
the others: a sample of the pairs, at least 25 %), and SIGKILL of e2fsck / the fsck
write-back / tar2sqfs at every one of their writes. Prints the totals (and --json-out).

    .venv/bin/python bench/crash_exhaustive.py                  # everything (root: dirty scenarios too)
    .venv/bin/python bench/crash_exhaustive.py --scenario sync  # one scenario
    CRASH_SEED=16 .venv/bin/python bench/crash_exhaustive.py --scenario sync --case power:12:subset:3

--case replays one case (as printed by a failure) and exits 1 if it fails. CRASH_SEED
(default 16) seeds every random draw; the same seed gives the same cases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.crash import harness, scenarios, tools  # noqa: E402

NESTED_PAIRS_FRACTION = {"sync": 1.0, "sync-dirty": 1.0}  # the rest: 0.3 of the pairs
TOOL_KILLS = {"sync-dirty": "e2fsck", "seal": "tar2sqfs"}


def plan_for(name: str, k: int) -> harness.Plan:
    return harness.Plan(kill_fraction=1.0, power_fraction=1.0, k=k,
                        nested_fraction=NESTED_PAIRS_FRACTION.get(name, 0.3), nested_points_fraction=1.0)


def run_one(name: str, k: int, case: str | None) -> dict[str, object]:
    base = harness.base_dir()
    start = time.monotonic()
    try:
        with harness.scenario_env(base):
            s = scenarios.make(name, base)
            if case is not None:
                if case.startswith("tool:"):
                    _, what, n = case.split(":")
                    tool, where = what.split("-", 1)
                    region = None
                    if tool == "e2fsck":
                        from tests.engine.conftest import region as overlay_region

                        region = overlay_region(s.image)
                    tools.count_writes(s, tool)
                    print(tools.kill_tool(s, tool, (where, int(n)), region))
                    failures = harness.TOTALS["failures"]
                    if failures:
                        raise AssertionError("\n".join(failures))  # type: ignore[arg-type]
                else:
                    print(harness.replay_case(s, case))
                return {"scenario": name, "case": case, "ok": True}
            counts = harness.run_scenario(s, plan_for(name, k))
            tool = TOOL_KILLS.get(name)
            if tool is not None:
                region = None
                if tool == "e2fsck":
                    from tests.engine.conftest import region as overlay_region

                    region = overlay_region(s.image)
                points = tools.count_writes(s, tool)
                counts["tool_kill_points"] = len(points)
                for point in points:
                    tools.kill_tool(s, tool, point, region)
            counts["named_states"] = s.justified
    finally:
        shutil.rmtree(base, ignore_errors=True)
    counts["seconds"] = round(time.monotonic() - start, 1)
    return {"scenario": name, **counts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=scenarios.NAMES, help="(repeatable) default: all")
    ap.add_argument("--case", help="replay one case id, e.g. kill:12, nested:12:3, power:12:torn-512:1, tool:e2fsck-tool:4")
    ap.add_argument("-k", type=int, default=4, help="draws per random power-loss model per cut point (default 4)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    names = args.scenario or list(scenarios.NAMES)
    if args.case and len(names) != 1:
        ap.error("--case needs exactly one --scenario")
    results = []
    start = time.monotonic()
    for name in names:
        if name in scenarios.ROOT_ONLY and os.geteuid() != 0:
            print(f"{name}: skipped: a dirty ext3 needs a kernel rw mount through a loop device (root)", flush=True)
            continue
        before = len(harness.TOTALS["failures"])  # type: ignore[arg-type]
        try:
            result = run_one(name, args.k, args.case)
        except AssertionError as exc:
            print(f"{name} {args.case}: FAILED\n{exc}", flush=True)
            return 1
        results.append(result)
        new_failures = harness.TOTALS["failures"][before:]  # type: ignore[index]
        print(f"{name}: {json.dumps(result)}; failures {len(new_failures)}", flush=True)
        for failure in new_failures[:30]:
            print(f"  FAIL {failure}", flush=True)
    if args.case:
        return 0
    t = harness.TOTALS
    totals = {
        "seed": harness.BASE_SEED,
        "cut_points": t["cut_points"],
        "distinct_end_states": {m: len(t["states"][m]) for m in harness.POWER_MODELS},  # type: ignore[index]
        "power_loss_cases": t["power_cases"],
        "real_kill_points": t["kill_points"],
        "nested_pairs": t["nested_pairs"],
        "tool_kills": t["tool_kills"],
        "outcomes": {"old": t["old"], "new": t["new"], "named": t["named"]},
        "failures": len(t["failures"]),  # type: ignore[arg-type]
        "seconds": round(time.monotonic() - start, 1),
        "scenarios": results,
    }
    print(harness.totals_line())
    print(json.dumps({k: v for k, v in totals.items() if k != "scenarios"}, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(totals, indent=1) + "\n")
    return 1 if t["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
