"""`sifoverlay` command line: argument parsing, --json, exit codes. No business logic.

Each verb lives in `sifoverlay/cli/cmd_<verb>.py` and exposes
``HELP`` (its one-line help), ``register(subparsers) -> None`` (adds its parser and sets
``func=run``) and ``run(args) -> int``. Command modules import only argparse and
`cli.output` (stdlib) at module level; they import the engine inside ``run`` so that
`sifoverlay overlay sync` starts fast. For the same reason only the verb on the command
line is imported and registered (the others get an empty placeholder parser), the full
list is built for the top-level --help only, and logging and json are imported when used
(bench/cli_start.py measures it, tests/cli/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import io
import os
import re
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from sifoverlay import __version__
from sifoverlay.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    PERMISSION_ERRNOS,
    NotAnOciSif,
    NotAuthorized,
    OciFormatError,
    SifOverlayError,
    UsageError,
    from_os_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

# (module name, ...) in the order they appear in --help.
COMMAND_MODULES = (
    "cmd_inspect",
    "cmd_import",
    "cmd_overlay",
    "cmd_log",
    "cmd_recover",
    "cmd_exec",
    "cmd_exporter",
    "cmd_push",
    "cmd_pull",
)
# argparse destinations that hold paths the user typed (errors name these, not our files)
PATH_ARGS = ("image", "images", "output", "source", "journal_dir", "textfile_dir", "scan", "base_dir")


_COLUMNS: list[int] = []  # the terminal width, found once per process


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns without importing shutil (and with it zlib, bz2,
    lzma): argparse makes a HelpFormatter for every add_argument."""
    if not _COLUMNS:
        try:
            columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                columns = 0
        _COLUMNS.append(columns if columns > 0 else 80)
    return _COLUMNS[0]


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)  # - 2: as argparse does


class _Parser(argparse.ArgumentParser):
    wants_json = False  # set by main() from argv: argparse's own errors obey --json too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit 2, never a traceback
        import json

        err = UsageError(None, message)
        if _Parser.wants_json:
            self.exit(EXIT_BAD_INPUT, json.dumps(err.as_dict()) + "\n")
        self.exit(EXIT_BAD_INPUT, f"sifoverlay: error: {err.message()}\n")


def verb_of(words: list[str]) -> str | None:
    """The COMMAND word of a command line (the first word that is no option: the top-level
    parser has no option that takes a value), None when there is none or when the top-level
    help is asked for before it."""
    for number, word in enumerate(words):
        if word in ("-h", "--help"):
            return None
        if word == "--":
            return words[number + 1] if number + 1 < len(words) else None
        if not word.startswith("-") or word == "-":
            return word
    return None


def _command_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"sifoverlay.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"sifoverlay.cli.{name}":
            return None  # verb not built yet
        raise


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser of `sifoverlay`. With `verb` (one of the command names) only that
    command's module is imported and its parser built; the other commands get an empty
    placeholder (their name still parses, and the top-level usage does not list them).
    Without `verb`, or with a word that names no command, every command is listed with its
    help (the top-level --help, argparse's "invalid choice"), still without building the
    commands' own arguments."""
    parser = _Parser(prog="sifoverlay", description="Manage writable overlays in OCI-SIF images.")
    parser.add_argument("--version", action="version", version=f"sifoverlay {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    names = [module.removeprefix("cmd_") for module in COMMAND_MODULES]
    chosen = _command_module(f"cmd_{verb}") if verb in names else None
    for name in names:
        if chosen is not None:
            if name == verb:
                chosen.register(sub)
            else:
                sub.add_parser(name, add_help=False)  # never parsed: `verb` is on the command line
            continue
        module = _command_module(f"cmd_{name}")
        if module is not None:
            sub.add_parser(name, help=module.HELP, add_help=False)
    return parser


def print_error(exc: SifOverlayError, as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(exc.as_dict()), file=sys.stderr)
    else:
        print(f"sifoverlay: {exc.message()}", file=sys.stderr)


# -- errors as the user should see them ------------------------------------------------------
def typed_paths(args: argparse.Namespace) -> list[str]:
    """The paths on the command line, in argument order."""
    found: list[str] = []
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item:
                found.append(item)
    return found


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def owner_of_internal(name: str, typed: list[str]) -> str | None:
    """The typed path that an internal working file belongs to (a hidden scratch, lease,
    staging or temp file beside it), or None when `name` is no internal file of ours."""
    if not typed or any(_same(name, t) for t in typed):
        return None
    if name.startswith("/proc/"):  # a file opened through /proc/self/fd/N: the image itself
        return typed[0]
    if any(os.path.abspath(name).startswith(d + os.sep) for d in scratch_dirs()):
        return typed[0]
    parts = os.path.abspath(name).split(os.sep)
    for number, part in enumerate(parts):
        if not part.startswith("."):
            continue
        directory = os.sep.join(parts[:number]) or os.sep
        for candidate in typed:
            beside = os.path.dirname(os.path.abspath(candidate)) == directory
            if beside and part.startswith("." + os.path.basename(os.path.abspath(candidate)) + "."):
                return candidate
        if "sifoverlay" in part:
            return next((t for t in typed if os.path.dirname(os.path.abspath(t)) == directory), typed[0])
    return None


def scratch_dirs() -> list[str]:
    """The engine's scratch directories (this process's state directory and root's)."""
    from sifoverlay.engine import statedir

    return [statedir.scratch_dir(), os.path.join(statedir.root_dir(), statedir.SCRATCH)]


def working_dir(name: str) -> str:
    """The directory an internal file lives in: a scratch directory, or the parent of
    the file's first hidden component."""
    found = next((d for d in scratch_dirs() if os.path.abspath(name).startswith(d + os.sep)), None)
    if found is not None:
        return found
    parts = os.path.abspath(name).split(os.sep)
    hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), len(parts) - 1)
    return os.sep.join(parts[:hidden]) or os.sep


def scrub(text: str) -> str:
    """`text` with the names of internal working files (engine scratch files, hidden
    temp/staging/lease files of ours) replaced by "a working file in DIR"."""
    def replace(match: re.Match[str]) -> str:
        return f"a working file in {working_dir(match.group(0))}"

    for directory in scratch_dirs():
        text = re.sub(re.escape(directory + os.sep) + r"[^\s:;,)'\"]+", replace, text)
    return _HIDDEN_WORK_FILE.sub(replace, text)


_HIDDEN_WORK_FILE = re.compile(r"(?<![^\s('\"])/[^\s:;,)'\"]*/\.[^/\s:;,)'\"]*sifoverlay[^\s:;,)'\"]*")


def for_user(exc: SifOverlayError, args: argparse.Namespace) -> SifOverlayError:
    """The same error naming a path the user typed instead of an internal working file,
    permission problems as NotAuthorized (exit 77), a native SIF with the import hint."""
    typed = typed_paths(args)
    path = exc.path
    if path is not None:
        owner = owner_of_internal(path, typed)
        if owner is not None:
            directory = working_dir(path)
            internal = exc.data.get("errno") and not path.startswith("/proc/")
            problem = f"{exc.problem} (working file in {directory})" if internal else exc.problem
            exc.path, exc.problem = owner, problem  # the same error, renamed
            exc.args = (exc.message(),)
    scrubbed = scrub(exc.problem)
    if scrubbed != exc.problem:
        exc.problem = scrubbed
        exc.args = (exc.message(),)
    if exc.data.get("errno") in PERMISSION_ERRNOS and not isinstance(exc, NotAuthorized):
        exc = NotAuthorized(exc.path, exc.problem, **exc.data)
    if isinstance(exc, NotAnOciSif) and "sifoverlay import" not in exc.problem and (
        exc.data.get("native") or "native SIF" in exc.problem or "no OCI root index" in exc.problem
    ):
        from sifoverlay.ocisif.model import CONVERT_HINT

        hint = CONVERT_HINT.format(path=exc.path or "IMAGE")
        exc = NotAnOciSif(exc.path, f"{exc.problem}; {hint}", **exc.data)
    return exc


def os_error_for_user(exc: OSError, args: argparse.Namespace) -> SifOverlayError:
    """An OSError as a one-line error of the tree, naming a path the user typed."""
    typed = typed_paths(args)
    name = exc.filename if isinstance(exc.filename, str) else None
    text = exc.strerror or str(exc)
    if name is None:
        return from_os_error(exc, typed[0] if typed else None, text)
    owner = owner_of_internal(name, typed)
    if owner is not None and name.startswith("/proc/"):
        return from_os_error(exc, owner, text)
    if owner is not None:
        return from_os_error(exc, owner, f"{text} (working file in {working_dir(name)})")
    return from_os_error(exc, name, text)


def _unencodable(exc: UnicodeError) -> tuple[bytes, int]:
    """Encoding error handler of stdout: argv's surrogate escapes (a file name that is not
    UTF-8) become their original bytes, anything else (a lone surrogate of a crafted
    JSON string) a backslash escape. Output never fails on a character."""
    assert isinstance(exc, UnicodeEncodeError)
    out = bytearray()
    for char in exc.object[exc.start:exc.end]:
        code = ord(char)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else char.encode("ascii", "backslashreplace")
    return bytes(out), exc.end


codecs.register_error("sifoverlay-output", _unencodable)


def _logging_setup(verbose: int) -> Callable[[], None]:
    """A function that sets up logging on stderr at the -v level, the first time it is
    called. Verbs with a fast path (the no-op `overlay sync`) call it only when they leave
    it: importing logging alone costs a fast start ~10 ms, a path that logs nothing need
    not pay it."""
    done: list[bool] = []

    def setup() -> None:
        if not done:
            done.append(True)
            _basic_config(verbose)

    return setup


def _basic_config(verbose: int) -> None:
    import logging

    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    _Parser.wants_json = "--json" in (words[: words.index("--")] if "--" in words else words)
    parser = build_parser(verb_of(words))
    args = parser.parse_args(words)
    args.setup_logging = _logging_setup(args.verbose)
    if not getattr(args, "defer_logging", False):  # a verb with a fast path calls args.setup_logging() itself
        args.setup_logging()
    as_json = bool(getattr(args, "json", False))
    if sys.stdout is not None and isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="sifoverlay-output")
    if sys.stdout is None:  # started with stdout closed (`>&-`): say so instead of failing in a write
        print_error(SifOverlayError(None, "cannot write the output: standard output is closed"), as_json)
        return EXIT_FAILURE
    try:
        return int(args.func(args) or 0)
    except SifOverlayError as exc:
        shown = for_user(exc, args)
        print_error(shown, as_json)
        return shown.exit_code
    except KeyboardInterrupt:
        typed = typed_paths(args)
        print_error(SifOverlayError(typed[0] if typed else None, "interrupted"), as_json)
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as exc:  # a file we were pointed at cannot be used: still one line
        shown = os_error_for_user(exc, args)
        print_error(shown, as_json)
        return shown.exit_code
    except Exception as exc:  # a bug: still one line (the traceback with -v)
        import logging

        from sifoverlay.ocisif.jsonedit import JsonError

        args.setup_logging()

        typed = typed_paths(args)
        if isinstance(exc, JsonError):  # an OCI document of the image that a layer below did not wrap
            shown = OciFormatError(typed[0] if typed else None, str(exc))
            print_error(shown, as_json)
            return shown.exit_code
        logging.getLogger(__name__).info("internal error", exc_info=True)
        detail = " ".join(str(exc).split())[:200]
        shown = SifOverlayError(typed[0] if typed else None, f"internal error: {type(exc).__name__}: {detail} "
                                "(run with -v for the traceback)")
        print_error(shown, as_json)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
