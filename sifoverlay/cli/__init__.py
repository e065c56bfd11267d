"""`sifoverlay` command line: argument parsing, --json, exit codes. No business logic.

Each verb lives in `sifoverlay/cli/cmd_<verb>.py` and exposes
``register(subparsers) -> None`` (adds its parser and sets ``func=run``) and
``run(args) -> int``. Command modules import only argparse and `cli.output` (stdlib) at
module level; they import
the engine inside ``run`` so that `sifoverlay overlay sync` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from sifoverlay import __version__
from sifoverlay.errors import EXIT_BAD_INPUT, EXIT_FAILURE, SifOverlayError

# (module name, ...) in the order they appear in --help.
COMMAND_MODULES = (
    "cmd_inspect",
    "cmd_import",
    "cmd_overlay",
    "cmd_recover",
    "cmd_exec",
    "cmd_exporter",
    "cmd_push",
    "cmd_pull",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, never a traceback
        self.exit(EXIT_BAD_INPUT, f"sifoverlay: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sifoverlay", description="Manage writable overlays in OCI-SIF images.")
    parser.add_argument("--version", action="version", version=f"sifoverlay {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"sifoverlay.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sifoverlay.cli.{name}":
                continue  # verb not built yet
            raise
        module.register(sub)
    return parser


def print_error(exc: SifOverlayError, as_json: bool) -> None:
    if as_json:
        print(json.dumps(exc.as_dict()), file=sys.stderr)
    else:
        print(f"sifoverlay: {exc.message()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except SifOverlayError as exc:
        print_error(exc, as_json)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sifoverlay: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as exc:  # a file we were pointed at cannot be used: still one line
        name = exc.filename if exc.filename is not None else ""
        print(f"sifoverlay: {name}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
