"""`sifoverlay pull oras://HOST/REPO:TAG OUT.sif | docker://HOST/REPO:TAG[@DIGEST] OUT.oci.sif
[--plain-http] [--platform P] [--json]`: fetch and verify, write OUT atomically."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "pull an image from a registry (oras:// SIF artifact or docker:// image) into a file"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "pull", help=HELP,
        description=HELP + ". Every digest is verified; OUT is replaced atomically. docker:// images of "
        "squashfs (+ext3) layers are stored as they are, other images go through `import`.",
    )
    parser.add_argument("ref", metavar="REF", help="oras://HOST/REPO[:TAG] or docker://HOST/REPO[:TAG][@DIGEST]")
    parser.add_argument("output", metavar="OUT", help="file to write")
    parser.add_argument("--plain-http", action="store_true", help="talk plain HTTP (loopback test registries)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="docker:// image index: which image")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.cli.cmd_push import ProgressBar
    from sifoverlay.fsio import io_from_env
    from sifoverlay.registry import pull

    bar = ProgressBar("pulling") if sys.stderr.isatty() and not args.json else None
    try:
        result = pull(args.ref, args.output, plain_http=args.plain_http, platform=args.platform,
                      progress=bar, io=io_from_env())
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"pulled {result.reference} into {result.output} ({result.size} bytes, {result.seconds:.2f} s)")
    print(f"  manifest {result.manifest_digest}")
    for i, digest in enumerate(result.layer_digests):
        print(f"  layer {i:<3} {digest}")
    return 0
