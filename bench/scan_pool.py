#!/usr/bin/env python3
"""Verify pass over many changed images: one at a time against the bounded pool (issue 17
item 4). Prints a table; asserts nothing.

--count images (default 100), each a sparse 64 MiB overlay into which debugfs wrote
--data-mib MiB of random bytes (default 4): every one is "modified" after a scan and is
hashed by the exporter's verify pass (engine.status verify=True: 64 MiB each, holes fed
from the zero buffer, data read from disk). Each run hashes all of them twice, with a
fresh Scanner each time: `run_verify_pass(workers=1)` (the serial baseline) and
`run_verify_pass()` (one worker per core), interleaved run by run; medians of --runs
(default 3). The page cache is dropped before every pass when run as root (else the
data comes from memory and only the hashing overlaps). The load average is printed
beside the result: other processes on the same cores shrink the gain.

With --sweep the same images are ended by the Slurm sweeper (`recover --slurm`): each
image gets a job session of this host and a writer lease held for a job slurmctld reports
as over (a fixed table, no cluster), and `sweeper.sweep(workers=1)` is timed against
`sweep()` (sweep_workers() job ends at once); every pass works on fresh copies.

    .venv/bin/python bench/scan_pool.py [--count 100] [--runs 3] [--dir /var/tmp] [--keep] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def build(work: Path, count: int, data_mib: int) -> Path:
    from reconcile import base_image, overlay_region  # bench/reconcile.py

    from sifoverlay import engine

    template = work / "template.sif"
    base_image(template)
    engine.create_overlay(template, size_mib=64, sparse=True, journal_dir=work / "journal")
    images = work / "images"
    images.mkdir()
    payload = work / "payload.bin"
    payload.write_bytes(os.urandom(data_mib << 20))
    offset, _ = overlay_region(template)
    for n in range(count):
        dest = images / f"img{n:04d}.sif"
        subprocess.run(["cp", "--sparse=always", str(template), str(dest)], check=True)
        subprocess.run(["debugfs", "-w", "-R", f"write {payload} upper/data{n}", f"{dest}?offset={offset}"],
                       check=True, capture_output=True)
    return images


def drop_caches() -> None:
    if os.geteuid() == 0:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:  # io-seam: exempt (bench, not an image)
                f.write("1\n")
        except OSError:
            pass


def one_pass(images: Path, journal: Path, workers: int | None) -> tuple[float, int, int]:
    from sifoverlay.metrics.scan import Scanner, run_verify_pass

    scanner = Scanner([str(images)], journal_dir=str(journal))
    scanner.scan()
    queued = len(scanner.verify_candidates())
    drop_caches()
    start = time.perf_counter()
    done = run_verify_pass(scanner, rate_bytes=None, stop=threading.Event(), workers=workers)
    seconds = time.perf_counter() - start
    states = {r.state for r in scanner.scan().images}
    if done != queued or states != {"drift"}:
        raise SystemExit(f"verify pass hashed {done} of {queued}, states {states}")
    return seconds, done, scanner.verified_bytes


class _AllOver:
    name = "fixed"

    def is_alive(self, job_id: str) -> bool:
        return False


def sweep_pass(images: Path, work: Path, workers: int | None) -> tuple[float, int, int]:
    """Fresh copies of `images`, each with a session and a lease of an over job; the
    sweeper's time to end them all. Returns (seconds, jobs reconciled, bytes hashed)."""
    import socket

    from sifoverlay.engine import sessions
    from sifoverlay.slurm.config import SlurmConfig
    from sifoverlay.slurm.sweeper import sweep

    run = Path(tempfile.mkdtemp(prefix="pass-", dir=work))
    copies = []
    for n, src in enumerate(sorted(images.iterdir())):
        dest = run / src.name
        subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
        copies.append((str(1000 + n), dest))
    config = SlurmConfig(journal_dir=str(run / "journal"), runtime_dir=str(run / "run"), state_dir=str(run / "state"))
    code = ("import os, socket, sys\nfrom sifoverlay.engine import lease\n"
            "args = sys.argv[2:]\nfor job, image in zip(args[::2], args[1::2]):\n"
            "    lease.acquire(image, lease.Holder(socket.gethostname(), os.getpid(), job, 'slurm'), ttl=3.0e7,"
            " state_dir=sys.argv[1])\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, config.state_dir, *[x for job, img in copies for x in (job, str(img))]],
                   check=True)
    for job, image in copies:
        st = os.stat(image)
        sessions.start(config.journal_dir, job, image, mode="rw", host=socket.gethostname(), uid=os.getuid(),
                       source="slurm", details={"dev": st.st_dev, "ino": st.st_ino})
    drop_caches()
    start = time.perf_counter()
    (run / "textfile").mkdir()
    report = sweep(config, _AllOver(), textfile_dir=str(run / "textfile"), cluster=False,  # type: ignore[arg-type]
                   workers=workers)
    seconds = time.perf_counter() - start
    results = {o.result for o in report.outcomes}
    if len(report.outcomes) != len(copies) or results != {"reconciled"}:
        raise SystemExit(f"sweep ended {len(report.outcomes)} of {len(copies)} jobs: {results}")
    size = sum(_overlay_size(img) for _, img in copies)
    shutil.rmtree(run, ignore_errors=True)
    return seconds, len(copies), size


def _overlay_size(image: Path) -> int:
    from reconcile import overlay_region  # bench/reconcile.py

    return overlay_region(image)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--data-mib", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the Slurm sweeper's job ends instead")
    args = parser.parse_args()
    from sifoverlay.metrics.scan import verify_workers

    if args.sweep:
        from sifoverlay.slurm.sweeper import sweep_workers

        verify_workers = sweep_workers  # noqa: F811 - the pool size printed below

    work = Path(tempfile.mkdtemp(prefix="sifoverlay-scanpool-", dir=args.dir))
    try:
        images = build(work, args.count, args.data_mib)
        journal = work / "journal"
        serial, pooled, hashed = [], [], 0
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):
            if args.sweep:
                seconds, _, hashed = sweep_pass(images, work, 1)
                serial.append(seconds)
                seconds, _, _ = sweep_pass(images, work, None)
                pooled.append(seconds)
                continue
            seconds, _, hashed = one_pass(images, journal, 1)
            serial.append(seconds)
            seconds, _, _ = one_pass(images, journal, None)
            pooled.append(seconds)
        load_after = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    s, p = statistics.median(serial), statistics.median(pooled)
    print(f"{args.count} changed images ({hashed / (1 << 30):.2f} GiB hashed per pass, {args.data_mib} MiB data each), "
          f"{args.runs} interleaved runs, {os.cpu_count()} CPUs, pool of {verify_workers()} workers, "
          f"page cache {'dropped' if os.geteuid() == 0 else 'warm'} before each pass, "
          f"load average (1 min) {load_before:.2f} -> {load_after:.2f}")
    what = "sweeper job ends" if args.sweep else "verify pass"
    print(f"{what:<24} {'median s':>9} {'min s':>7} {'GiB/s':>7}")
    for name, samples in (("serial (workers=1)", serial), (f"pool (workers={verify_workers()})", pooled)):
        median = statistics.median(samples)
        print(f"{name:<24} {median:9.2f} {min(samples):7.2f} {hashed / (1 << 30) / median:7.2f}")
    print(f"speed-up of the pool over the serial pass: {s / p:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
