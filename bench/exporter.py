#!/usr/bin/env python3
"""Exporter scan benchmark: N small sparse OCI-SIFs (default 10 000), full scan time and
RSS, against a baseline measured in the same run (os.stat + a 1 KiB pread per file).

    .venv/bin/python bench/exporter.py [--count 10000] [--dir /var/tmp] [--keep]

Targets (issue 6): a full scan <= 2 s, RSS <= 150 MB. Prints one JSON object; never
asserts. One template image is built (a ~16 KiB OCI-SIF from scripts/busybox-layout.py
--no-busybox + a sparse 64 MiB overlay, ~350 KiB allocated) and cloned with copy_file_range over its data extents only,
so the clones stay sparse. The scan runs in a fresh child process so that its peak RSS
(ru_maxrss) is the exporter's, not the generator's. Everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUT_SCRIPT = REPO / "scripts" / "busybox-layout.py"  # Debian's busybox-static as an OCI layout


def sparse_clone(src_fd: int, size: int, extents: list[tuple[int, int]], dest: str) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for start, length in extents:
            done = 0
            while done < length:
                n = os.copy_file_range(src_fd, fd, length - done, start + done, start + done)
                if n <= 0:
                    raise OSError(f"copy_file_range returned {n}")
                done += n
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def generate(directory: Path, count: int) -> dict[str, float]:
    from sifoverlay import engine

    from sifoverlay.ocisif.importer import import_image

    template = directory / "template.oci.sif.src"
    subprocess.run([sys.executable, str(LAYOUT_SCRIPT), "--no-busybox", str(directory / "layout")], check=True, capture_output=True)
    import_image(directory / "layout", template)
    shutil.rmtree(directory / "layout")
    engine.create_overlay(template, size_mib=64, sparse=True, journal_dir=directory / "journal")
    images = directory / "images"
    images.mkdir()
    start = time.monotonic()
    fd = os.open(template, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents = data_extents(fd, size)
        for i in range(count):
            sparse_clone(fd, size, extents, str(images / f"img{i:05d}.oci.sif"))
    finally:
        os.close(fd)
    allocated = sum(e[1] for e in extents)
    return {"generate_seconds": round(time.monotonic() - start, 3), "image_bytes": size,
            "image_allocated_bytes": allocated}


def baseline(images: list[str]) -> float:
    start = time.perf_counter()
    for path in images:
        os.stat(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(fd, 1024, 0)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def child(directory: str, journal_dir: str, warm_runs: int) -> None:
    """Runs in a fresh interpreter: the exporter's scan + render, its peak RSS."""
    from prometheus_client import CollectorRegistry, generate_latest

    from sifoverlay.metrics.collector import OverlayCollector
    from sifoverlay.metrics.scan import Scanner, discover

    images = discover([directory])
    base = [baseline(images) for _ in range(3)]
    scanner = Scanner([directory], journal_dir=journal_dir)
    start = time.perf_counter()
    snap = scanner.scan()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(warm_runs):
        start = time.perf_counter()
        snap = scanner.scan()
        warm.append(time.perf_counter() - start)
    registry = CollectorRegistry()
    registry.register(OverlayCollector(scanner, max_age=3600))
    start = time.perf_counter()
    text = generate_latest(registry)
    render = time.perf_counter() - start
    states: dict[str, int] = {}
    for report in snap.images:
        states[report.state] = states.get(report.state, 0) + 1
    json.dump({
        "images": len(snap.images), "states": states,
        "baseline_stat_pread_seconds": round(min(base), 4),
        "cold_scan_seconds": round(cold, 3),
        "warm_scan_seconds_median": round(statistics.median(warm), 3),
        "warm_scan_seconds_min": round(min(warm), 3),
        "warm_over_baseline": round(statistics.median(warm) / min(base), 2),
        "cold_over_baseline": round(cold / min(base), 2),
        "render_seconds": round(render, 3), "exposition_bytes": len(text),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, sys.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--dir", default="/var/tmp", help="where to generate the images (a disk, not tmpfs)")
    parser.add_argument("--warm-runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    parser.add_argument("--child", nargs=2, metavar=("IMAGES", "JOURNAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.warm_runs)
        return 0
    work = Path(tempfile.mkdtemp(prefix="sifoverlay-bench-exporter-", dir=args.dir))
    try:
        report: dict[str, object] = {"count": args.count, "machine": {
            "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}}
        report.update(generate(work, args.count))
        proc = subprocess.run([sys.executable, __file__, "--warm-runs", str(args.warm_runs), "--child",
                               str(work / "images"), str(work / "journal")],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return 1
        result = json.loads(proc.stdout)
        report.update(result)
        report["targets"] = {"scan_seconds": 2.0, "rss_mb": 150.0,
                             "warm_scan_within": result["warm_scan_seconds_median"] <= 2.0,
                             "rss_within": result["peak_rss_mb"] <= 150.0}
        print(json.dumps(report, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
