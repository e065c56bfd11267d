"""`sifoverlay exporter --scan PATH... [--listen ADDR:PORT] [--interval S]
[--verify-interval S] [--hash-rate-limit MB/s] [--journal-dir DIR]`: serve Prometheus
metrics about the overlays of the configured images until SIGTERM (docs/metrics.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

HELP = "serve Prometheus metrics about the overlays of the images under PATH"


def _number(*, minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a float > minimum (>= with `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>=' if inclusive else '>'} {minimum:g}")
        return value

    return parse


_positive = _number(minimum=0, inclusive=False)
_non_negative = _number(minimum=0, inclusive=True)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "exporter", help=HELP,
        description=HELP + ". A scan (superblock fingerprint only) runs every --interval seconds; "
        "overlays found modified or unknown are hashed every --verify-interval seconds (and on "
        "SIGUSR1) under --hash-rate-limit. Only the images named here (files, or *.sif in "
        "directories) become `image` label values.")
    parser.add_argument("--scan", nargs="+", required=True, metavar="PATH",
                        help="OCI-SIF files, or directories whose *.sif files are scanned (not recursive)")
    parser.add_argument("--listen", default="0.0.0.0:9851", metavar="ADDR:PORT",
                        help="address to serve /metrics on (default 0.0.0.0:9851)")
    parser.add_argument("--interval", type=_positive, default=15.0, metavar="S",
                        help="seconds between scans (default 15)")
    parser.add_argument("--verify-interval", type=_positive, default=3600.0, metavar="S",
                        help="seconds between verify (hashing) passes (default 3600)")
    parser.add_argument("--hash-rate-limit", type=_non_negative, default=50.0, metavar="MB/s",
                        help="hashing speed limit in MB/s (10^6 bytes), 0 = unlimited (default 50)")
    parser.add_argument("--journal-dir", metavar="DIR", default=None,
                        help="journal directory (default: see `overlay sync --help`)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.metrics.exporter import ExporterConfig, parse_listen, serve

    host, port = parse_listen(args.listen)
    config = ExporterConfig(
        scan_paths=tuple(args.scan), host=host, port=port, interval=args.interval,
        verify_interval=args.verify_interval,
        hash_rate=args.hash_rate_limit * 1e6 if args.hash_rate_limit > 0 else None,
        journal_dir=args.journal_dir,
    )
    return serve(config)
