#!/usr/bin/env python3
"""Benchmark: `sifoverlay push IMAGE docker://...` of a 1 GiB image vs `skopeo copy` of the
same blobs (an OCI layout holding the image's layers, config and manifest) to the same
loopback registry. Prints medians and the ratio ours/skopeo (target <= 1.2).
Each timed push goes to a freshly started, empty registry: skopeo mounts blobs it has
seen in another repository of the same registry (0.3 s "pushes"), which is not a push.

The layer is 1 GiB of random bytes in an uncompressed squashfs (real bytes, no holes),
plus the image's 64 MiB sparse ext3 overlay. Everything generated is deleted at the end.

    .venv/bin/python bench/push.py [--size-mib 1024] [--runs 3] [--oras]
"""

from __future__ import annotations

import argparse
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

from tests.registry.conftest import _start, _stop, build_ocisif, sha256_file, squashfs_from  # noqa: E402


def timed_fresh(work: Path, argv_for: object) -> float:
    """Start an empty registry, time the push argv_for(host) into it, stop and wipe it."""
    where = work / "registry"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir()
    proc, registry = _start(where, auth=False)
    try:
        return timed(argv_for(registry.host))  # type: ignore[operator]
    finally:
        _stop(proc)
        shutil.rmtree(where, ignore_errors=True)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()[-400:]}")
    return elapsed


def make_image(work: Path, size_mib: int) -> tuple[Path, Path]:
    """(OCI-SIF, OCI layout with the same blobs)."""
    tree = work / "tree"
    tree.mkdir()
    with open(tree / "random.bin", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    layer = squashfs_from(tree, work / "layer.sqfs", "-noI", "-noD", "-noF", "-noX")
    shutil.rmtree(tree)
    image = build_ocisif([layer], work / "bench.oci.sif")
    from sifoverlay.ocisif import open_image

    layout = work / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    with open_image(image) as img:
        layer.rename(blobs / img.layers[0].digest.split(":")[1])
        overlay = img.overlay
        assert overlay is not None
        subprocess.run(["dd", f"if={image}", f"of={blobs / overlay.recorded_digest.split(':')[1]}", "bs=4M",
                        f"skip={overlay.offset}", f"count={overlay.size}", "iflag=skip_bytes,count_bytes",
                        "conv=sparse", "status=none"], check=True)
        (blobs / img.config.digest.split(":")[1]).write_bytes(img.config.raw)
        (blobs / img.manifest.digest.split(":")[1]).write_bytes(img.manifest.raw)
        entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": img.manifest.digest,
                 "size": len(img.manifest.raw), "annotations": {"org.opencontainers.image.ref.name": "b"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for path in blobs.iterdir():
        assert sha256_file(path).split(":")[1] == path.name, f"layout blob {path.name} is wrong"
    return image, layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--oras", action="store_true", help="also time an oras:// push of the SIF file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sifoverlay-bench-push-"))
    os.environ["SIFOVERLAY_JOURNAL_DIR"] = str(work / "journal")
    try:
        image, layout = make_image(work, args.size_mib)
        size = image.stat().st_size
        ours, skopeo, oras = [], [], []
        for run in range(args.runs):
            ours.append(timed_fresh(work, lambda host: [sys.executable, "-m", "sifoverlay", "push", str(image),
                                                        f"docker://{host}/bench/img:b", "--plain-http"]))
            skopeo.append(timed_fresh(work, lambda host: ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                                                          f"oci:{layout}:b", f"docker://{host}/bench/img:b"]))
            if args.oras:
                oras.append(timed_fresh(work, lambda host: [sys.executable, "-m", "sifoverlay", "push", str(image),
                                                            f"oras://{host}/bench/img:b", "--plain-http"]))
        mine, theirs = statistics.median(ours), statistics.median(skopeo)
        print(f"image: {size / (1 << 20):.0f} MiB ({args.size_mib} MiB random squashfs layer + 64 MiB sparse overlay)")
        print(f"sifoverlay push docker:// : median {mine:.2f} s  runs {', '.join(f'{t:.2f}' for t in ours)}"
              f"  ({size / mine / 1e6:.0f} MB/s)")
        print(f"skopeo copy oci: docker:// : median {theirs:.2f} s  runs {', '.join(f'{t:.2f}' for t in skopeo)}"
              f"  ({size / theirs / 1e6:.0f} MB/s)")
        if oras:
            print(f"sifoverlay push oras://   : median {statistics.median(oras):.2f} s  "
                  f"runs {', '.join(f'{t:.2f}' for t in oras)}")
        ratio = mine / theirs
        print(f"ratio ours/skopeo = {ratio:.2f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
