"""Output helpers shared by the CLI verbs: the --json flag, JSON on stdout, and a
one-line progress bar on stderr (TTY only). Standard library only: imported on every
`sifoverlay` start, including the benchmarked no-op `overlay sync`."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def write_text(text: str) -> None:
    """Text on stdout that never fails to encode: a file name that is not UTF-8 (argv's
    surrogate escapes) comes out as its original bytes, a lone surrogate of a crafted
    JSON string as a backslash escape."""
    encoding = sys.stdout.encoding or "utf-8"
    try:
        data = text.encode(encoding, "surrogateescape")
    except (UnicodeEncodeError, LookupError):
        data = text.encode("utf-8", "backslashreplace")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode(encoding, "replace"))
        return
    sys.stdout.flush()
    buffer.write(data)
    sys.stdout.flush()


def print_json(data: Any) -> None:
    import json  # not on every start: a text-mode `overlay sync` does not need it

    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


_BAR_WIDTH = 30


def _bar(done: int, total: int) -> str:
    filled = int(_BAR_WIDTH * min(done, total) / total)
    return f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"


def transfer_text(label: str, done: int, total: int) -> str:
    """Registry transfers: MiB so far / total (total <= 0: unknown, MiB so far only)."""
    mib = done / (1 << 20)
    if total <= 0:
        return f"{label} {mib:8.1f} MiB"
    return f"{label} {_bar(done, total)} {mib:8.1f} / {total / (1 << 20):.1f} MiB"


def hashing_text(label: str, done: int, total: int) -> str:
    """Overlay hashing: percentage and GiB."""
    if total <= 0:
        return f"{label} {_bar(1, 1)} {100.0:5.1f}% {done / (1 << 30):.2f}/0.00 GiB"
    return f"{label} {_bar(done, total)} {100.0 * done / total:5.1f}% {done / (1 << 30):.2f}/{total / (1 << 30):.2f} GiB"


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second; `render`
    turns (label, done, total) into its text."""

    def __init__(self, label: str, render: Callable[[str, int, int], str] = transfer_text) -> None:
        self.label = label
        self.render = render
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        sys.stderr.write("\r" + self.render(self.label, done, total))
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextlib.contextmanager
def progress(
    label: str, *, quiet: bool, render: Callable[[str, int, int], str] = transfer_text
) -> Iterator[ProgressBar | None]:
    """A ProgressBar when stderr is a terminal and not `quiet` (--json), else None; its
    line is ended on exit, before anything goes to stdout."""
    bar = ProgressBar(label, render) if sys.stderr.isatty() and not quiet else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
