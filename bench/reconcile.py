#!/usr/bin/env python3
"""Benchmark of the reconcile engine (issue 3 item 8). Prints JSON; asserts nothing.

* changed overlay: a 1 GiB overlay with ~900 MB written through a kernel loop mount;
  each run touches it (debugfs write, not timed) and times `engine.sync` (quiesce, lease,
  hole-aware sha256, journaled commit). Baseline: hashlib.sha256 over the same byte range
  read with readinto (4 MiB). Target: ratio <= 1.10.
* the same changed overlay through the CLI (issue 17): wall time of a whole
  `sifoverlay overlay sync` process against a whole `python -c <hashlib over the same
  range>` process (the same comparison the Epilog pays for), interleaved run by run.
  Target: ratio <= 1.10.
* untouched 8 GiB sparse overlay: wall time of the CLI `sifoverlay overlay sync` process
  (fingerprint fast path, no hashing). Target: <= 0.2 s.
Medians of --runs runs (default 5). Needs root (loop mount), mkfs.ext3, debugfs.

    .venv/bin/python bench/reconcile.py [--runs N] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

from sifoverlay import engine  # noqa: E402
from sifoverlay.ocisif import jsonedit, mediatypes, open_image  # noqa: E402
from sifoverlay.ocisif.build import write_ocisif  # noqa: E402

MIB = 1 << 20


def base_image(path: Path) -> None:
    """A small OCI-SIF with one (fake) squashfs layer; enough for overlay work."""
    layer = b"\0" * 4096
    layer_digest = jsonedit.digest_of(layer)
    config = jsonedit.canonical({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}, "history": [{"created_by": "bench"}],
    })
    manifest = jsonedit.canonical({
        "schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
        "config": jsonedit.descriptor_of(config, mediatypes.OCI_CONFIG),
        "layers": [jsonedit.descriptor_of(layer, mediatypes.SQUASHFS_LAYER)],
    })
    index = jsonedit.new_index([jsonedit.descriptor_of(manifest, mediatypes.OCI_MANIFEST)])
    write_ocisif(path, [layer, config, manifest], index)


def overlay_region(path: Path) -> tuple[int, int]:
    with open_image(path) as img:
        assert img.overlay is not None
        return img.overlay.offset, img.overlay.size


def fill_overlay(path: Path, mnt: Path, nbytes: int) -> None:
    from sifoverlay import ext3

    offset, size = overlay_region(path)
    mnt.mkdir(exist_ok=True)
    with ext3.loop_device(path, offset, size) as dev:
        subprocess.run(["mount", "-t", "ext3", dev, str(mnt)], check=True)
        try:
            chunk = os.urandom(4 * MIB)
            written, n = 0, 0
            while written < nbytes:
                with open(mnt / "upper" / f"f{n:04d}.bin", "wb") as f:
                    for _ in range(16):
                        f.write(chunk)
                        written += len(chunk)
                n += 1
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def touch(path: Path, scratch: Path, n: int) -> None:
    offset, _ = overlay_region(path)
    src = scratch / "touch.txt"
    src.write_text(f"run {n}\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {src} upper/touch{n}", f"{path}?offset={offset}"],
                   check=True, capture_output=True)


def plain_sha256(path: Path, offset: int, size: int) -> float:
    buf = bytearray(4 * MIB)
    view = memoryview(buf)
    start = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = size
        while left:
            n = f.readinto(view[: min(len(buf), left)])
            h.update(view[:n])
            left -= n
    return time.perf_counter() - start


# An installed package has its .pyc files: a shell with PYTHONDONTWRITEBYTECODE would make
# every process compile the modules edited since (tens of ms per run).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

HASHLIB_PROCESS = """
import hashlib, sys
path, offset, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = bytearray(4 << 20)
view = memoryview(buf)
h = hashlib.sha256()
with open(path, "rb", buffering=0) as f:
    f.seek(offset)
    left = size
    while left:
        n = f.readinto(view[: min(len(buf), left)])
        h.update(view[:n])
        left -= n
print("sha256:" + h.hexdigest())
"""


def cli_sync_wall(path: Path, journal: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sifoverlay", "overlay", "sync", "--journal-dir", str(journal), str(path)],
                   check=True, capture_output=True, cwd=REPO, env=ENV)
    return time.perf_counter() - start


def hashlib_process_wall(path: Path, offset: int, size: int) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HASHLIB_PROCESS, str(path), str(offset), str(size)],
                          check=True, capture_output=True, text=True, cwd=REPO, env=ENV)
    return time.perf_counter() - start, proc.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="where to put the test images")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/reconcile.py needs root (kernel loop mount)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sifoverlay-bench-", dir=args.dir))
    journal = work / "journal"
    out: dict[str, object] = {"runs": args.runs}
    try:
        changed = work / "changed.sif"
        base_image(changed)
        engine.create_overlay(changed, size_mib=1024, sparse=True, journal_dir=journal)
        fill_overlay(changed, work / "mnt", 900 * 10**6)
        engine.sync(changed, journal_dir=journal)
        offset, size = overlay_region(changed)
        sync_times, sha_times, actions = [], [], []
        for n in range(args.runs):
            touch(changed, work, n)
            t0 = time.perf_counter()
            result = engine.sync(changed, journal_dir=journal)
            sync_times.append(time.perf_counter() - t0)
            actions.append(result.action)
            sha_times.append(plain_sha256(changed, offset, size))
        out["changed_1GiB"] = {
            "overlay_bytes": size, "allocated_bytes": os.stat(changed).st_blocks * 512,
            "sync_median_s": round(statistics.median(sync_times), 4),
            "sha256_median_s": round(statistics.median(sha_times), 4),
            "ratio_sync_over_sha256": round(statistics.median(sync_times) / statistics.median(sha_times), 3),
            "sync_runs_s": [round(t, 4) for t in sync_times], "actions": actions,
        }
        cli_times, proc_times, cli_ok = [], [], []
        load_before = os.getloadavg()[0]
        for n in range(args.runs):  # interleaved: a load change hits both alike
            touch(changed, work, 1000 + n)
            cli_times.append(cli_sync_wall(changed, journal))
            seconds, digest = hashlib_process_wall(changed, offset, size)
            proc_times.append(seconds)
            with open_image(changed) as img:
                assert img.overlay is not None
                cli_ok.append(img.overlay.recorded_digest == digest)
        out["changed_1GiB_cli"] = {
            "cli_sync_median_s": round(statistics.median(cli_times), 4),
            "hashlib_process_median_s": round(statistics.median(proc_times), 4),
            "ratio_cli_over_hashlib_process": round(statistics.median(cli_times) / statistics.median(proc_times), 3),
            "cli_runs_s": [round(t, 4) for t in cli_times], "hashlib_runs_s": [round(t, 4) for t in proc_times],
            "recorded_digest_is_hashlibs": all(cli_ok),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        untouched = work / "untouched.sif"
        base_image(untouched)
        engine.create_overlay(untouched, size_mib=8192, sparse=True, journal_dir=journal)
        walls = [cli_sync_wall(untouched, journal) for _ in range(args.runs)]
        floors = []
        for _ in range(args.runs):  # the interpreter alone, for context on a loaded machine
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True, cwd=REPO)
            floors.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        forced = engine.sync(untouched, journal_dir=journal, force_hash=True)
        forced_s = time.perf_counter() - t0
        o8, s8 = overlay_region(untouched)
        out["untouched_8GiB_sparse"] = {
            "overlay_bytes": s8, "cli_sync_wall_median_s": round(statistics.median(walls), 4),
            "cli_sync_runs_s": [round(t, 4) for t in walls],
            "python_startup_median_s": round(statistics.median(floors), 4),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "forced_hash_sync_s": round(forced_s, 3), "forced_action": forced.action,
            "plain_sha256_s": round(plain_sha256(untouched, o8, s8), 3),
        }
        out["targets"] = {"ratio_max": 1.10, "cli_ratio_max": 1.10, "untouched_cli_wall_max_s": 0.2}
        ratio = out["changed_1GiB"]["ratio_sync_over_sha256"]  # type: ignore[index]
        cli_ratio = out["changed_1GiB_cli"]["ratio_cli_over_hashlib_process"]  # type: ignore[index]
        out["targets_met"] = {
            "engine_sync": ratio <= 1.10, "cli_sync": cli_ratio <= 1.10,
            "untouched_cli": out["untouched_8GiB_sparse"]["cli_sync_wall_median_s"] <= 0.2,  # type: ignore[index]
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
