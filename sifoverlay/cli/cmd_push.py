"""`sifoverlay push IMAGE oras://HOST/REPO:TAG | docker://HOST/REPO:TAG
[--layer-format squashfs|tar] [--plain-http] [--json]`: reconcile the overlay, then push."""

from __future__ import annotations

import argparse
from typing import Any

from sifoverlay.cli.output import add_json_flag, print_json, progress

HELP = "reconcile the overlay, then push the image to a registry (oras:// or docker://)"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "push", help=HELP,
        description=HELP + ". The overlay is always reconciled first (engine sync), so its digest is current. "
        "oras:// pushes the OCI-SIF file as a SingularityCE SIF artifact; docker:// pushes the OCI image: "
        "layers as stored (squashfs + ext3 overlay, what SingularityCE runs) or, with --layer-format tar, "
        "as OCI tar layers with the overlay's changes as the top layer (what any OCI runtime runs).",
    )
    parser.add_argument("image", metavar="IMAGE", help="OCI-SIF image")
    parser.add_argument("ref", metavar="REF", help="oras://HOST/REPO[:TAG] or docker://HOST/REPO[:TAG]")
    parser.add_argument("--layer-format", choices=("squashfs", "tar"), default="squashfs",
                        help="docker:// only: layers as stored (default) or OCI tar+gzip layers")
    parser.add_argument("--plain-http", action="store_true", help="talk plain HTTP (loopback test registries)")
    parser.add_argument("--journal-dir", help="engine journal directory (default: see `overlay sync`)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.fsio import io_from_env
    from sifoverlay.registry import push

    with progress("pushing", quiet=args.json) as bar:
        result = push(args.image, args.ref, layer_format=args.layer_format, plain_http=args.plain_http,
                      progress=bar, journal_dir=args.journal_dir, io=io_from_env())
    if args.json:
        print_json(result.as_dict())
        return 0
    if result.sync is not None:
        print(f"{result.image}: overlay {result.sync['action']} ({result.sync['new_digest']})")
    print(f"pushed {result.image} to {result.reference} ({result.transport}, {result.layer_format} layers, "
          f"{result.bytes_uploaded} bytes uploaded in {result.seconds:.2f} s)")
    print(f"  manifest {result.manifest_digest}")
    for i, layer in enumerate(result.layers):
        note = "" if layer.uploaded else "  (already there)"
        print(f"  layer {i:<3} {layer.digest}  {layer.size:>12}  {layer.source}{note}")
    return 0
