#!/usr/bin/env python3
"""Start-up cost of the CLI (issue 17 item 3). Prints a table; asserts nothing.

Wall time of whole processes, interleaved run by run, median of --runs (default 21, at
least 15) each:

* `python -c pass` from the same venv (the bare interpreter: the floor);
* `python -m sifoverlay --help`;
* `python -m sifoverlay overlay status IMG` on a clean 64 MiB sparse overlay (fingerprint: no hashing),
  answered from the memo the previous status left (engine/statusmemo.py);
* the same status without that memo (a fresh state directory each run): what the first
  status after a write costs (shown, no target);
* `python -m sifoverlay overlay sync IMG` on the same image (fingerprint fast path: noop).

Target: status and the no-op sync at most the floor + 30 ms. The machine's load average
is printed beside the result: on a busy machine every median grows, the differences too.
Needs mkfs.ext3 (overlay create); no root.

    .venv/bin/python bench/cli_start.py [--runs N] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TARGET_MS = 30.0


# The warm-up run writes the .pyc files, as an installed package has them: a shell with
# PYTHONDONTWRITEBYTECODE would otherwise compile every module edited since on every run.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(argv: list[str], env: dict[str, str] = ENV) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--dir", default=None, help="where to put the test image (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.runs < 15:
        parser.error("--runs must be at least 15")
    from sifoverlay import engine

    work = Path(tempfile.mkdtemp(prefix="sifoverlay-clistart-", dir=args.dir))
    try:
        image, journal = work / "image.sif", work / "journal"
        from reconcile import base_image  # bench/reconcile.py

        base_image(image)
        engine.create_overlay(image, size_mib=64, sparse=True, journal_dir=journal)
        engine.sync(image, journal_dir=journal)
        # Status and the no-op sync answer from the CLI's memos (engine/statusmemo.py,
        # noopmemo.py) once the image has been left alone for QUIET_NS: measure that steady
        # state (a job's image between jobs), not the first seconds after its sync.
        from sifoverlay.engine import statusmemo

        quiet_at = (os.stat(image).st_ctime_ns + statusmemo.QUIET_NS) / 1e9 + 0.1
        time.sleep(max(0.0, quiet_at - time.time()))
        py = sys.executable
        cli = [py, "-m", "sifoverlay"]
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "sifoverlay --help": [*cli, "--help"],
            "overlay status": [*cli, "overlay", "status", "--journal-dir", str(journal), str(image)],
            "overlay status (no memo)": [*cli, "overlay", "status", "--journal-dir", str(journal), str(image)],
            "overlay sync (noop)": [*cli, "overlay", "sync", "--journal-dir", str(journal), str(image)],
        }
        cold = work / "cold-state"  # the no-memo status's own state directory, emptied before each run
        cold_env = {**ENV, "SIFOVERLAY_STATE_DIR": str(cold)}

        def run(name: str) -> float:
            if name != "overlay status (no memo)":
                return wall(cases[name])
            shutil.rmtree(cold, ignore_errors=True)
            return wall(cases[name], cold_env)

        for name in cases:  # warm the page cache and the .pyc files
            run(name)
        times: dict[str, list[float]] = {name: [] for name in cases}
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):  # interleaved: a load change hits every case alike
            for name in cases:
                times[name].append(run(name))
        load_after = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    floor = statistics.median(times["python -c pass"]) * 1e3
    print(f"{sys.executable}: {args.runs} interleaved runs each, load average (1 min) {load_before:.2f} -> "
          f"{load_after:.2f}, {os.cpu_count()} CPUs")
    print(f"{'command':<30} {'median ms':>10} {'min ms':>8} {'+ floor ms':>11}  target")
    met = True
    for name, samples in times.items():
        median = statistics.median(samples) * 1e3
        extra = median - floor
        verdict = ""
        if name in ("overlay status", "overlay sync (noop)"):
            ok = extra <= TARGET_MS
            met &= ok
            verdict = f"<= +{TARGET_MS:.0f} ms: {'met' if ok else 'NOT met'}"
        print(f"{name:<30} {median:10.1f} {min(samples) * 1e3:8.1f} {extra:11.1f}  {verdict}")
    print(f"target (status and no-op sync within python -c pass + {TARGET_MS:.0f} ms): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
