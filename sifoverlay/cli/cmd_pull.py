"""`sifoverlay pull oras://HOST/REPO:TAG OUT.sif | docker://HOST/REPO:TAG[@DIGEST] OUT.oci.sif
[--plain-http] [--platform P] [--json]`: fetch and verify, write OUT atomically."""

from __future__ import annotations

import argparse
from typing import Any

from sifoverlay.cli.output import add_json_flag, print_json, progress

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
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.fsio import io_from_env
    from sifoverlay.registry import pull

    with progress("pulling", quiet=args.json) as bar:
        result = pull(args.ref, args.output, plain_http=args.plain_http, platform=args.platform,
                      progress=bar, io=io_from_env())
    if args.json:
        print_json(result.as_dict())
        return 0
    print(f"pulled {result.reference} into {result.output} ({result.size} bytes, {result.seconds:.2f} s)")
    print(f"  manifest {result.manifest_digest}")
    for i, digest in enumerate(result.layer_digests):
        print(f"  layer {i:<3} {digest}")
    return 0
