"""`sifoverlay import SOURCE OUT.oci.sif [--platform P] [--squash] [--json]`: build a
deterministic OCI-SIF from an OCI image layout (DIR or DIR:TAG) or a native SIF file."""

from __future__ import annotations

import argparse
from typing import Any

from sifoverlay.cli.output import add_json_flag, print_json

HELP = "build an OCI-SIF from an OCI image layout or a native SIF"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "import",
        help=HELP,
        description=HELP + ". Tar layers become squashfs layers with overlayfs whiteouts; "
        "a native SIF's primary squashfs partition becomes the single layer. "
        "Importing the same source twice gives byte-identical files.",
    )
    parser.add_argument("source", metavar="SOURCE", help="OCI layout directory, DIR:TAG, or native SIF file")
    parser.add_argument("output", metavar="OUT.oci.sif", help="OCI-SIF file to write (replaced atomically)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="image to take from a multi-platform index (default: the host's)")
    parser.add_argument("--squash", action="store_true", help="flatten all layers into one squashfs layer")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.fsio import io_from_env
    from sifoverlay.ocisif.importer import import_image

    result = import_image(args.source, args.output, platform=args.platform, squash=args.squash, io=io_from_env())
    if args.json:
        print_json(result.as_dict())
        return 0
    print(f"{result.output}: {len(result.layers)} squashfs layer(s), {result.file_size} bytes"
          f"{' (squashed)' if result.squashed else ''}")
    print(f"  manifest {result.manifest_digest}")
    print(f"  config   {result.config_digest}")
    for i, layer in enumerate(result.layers):
        origin = "" if layer.source_digest == layer.digest else f"  <- {layer.source_digest}"
        print(f"  layer {i:<3} {layer.digest}  {layer.size:>10}{origin}")
    return 0
