"""Logging for the Slurm entry points (Prolog, Epilog, sweeper): key=value lines with
the job and image on every line, to stderr and to a log file (slurmd drops a Prolog's
output). Library modules only use logging.getLogger(__name__).

Every value (fields and the message) may carry user-chosen text - the image path from
--oci-sif-overlay, a file name in an error - so none may end a line or start a field:
a value with whitespace, quotes, backslashes, '=' or control characters is written
double-quoted with those escaped (``\\n``, ``\\"``, ``\\xNN``); one record is always
exactly one line (docs/security.md, finding 9)."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Final

__all__ = ["DEFAULT_LOG_FILE", "escape", "field", "setup"]

DEFAULT_LOG_FILE: Final = "/var/log/sifoverlay/slurm.log"
ENV_LOG_FILE: Final = "SIFOVERLAY_SLURM_LOG"


_PLAIN = re.compile(r"[^\s\"\\=\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPECIAL = re.compile(r"[\"\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with backslash, double quote and every control/line-breaking character
    escaped: the result never contains a line break or an unescaped quote."""
    def one(match: re.Match[str]) -> str:
        ch = match.group(0)
        return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")

    return _SPECIAL.sub(one, text)


def field(value: object) -> str:
    """One key=value value: as is when it is a plain token, else double-quoted and escaped."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return f'"{escape(text)}"'


class _KeyValue(logging.Formatter):
    def __init__(self, entry: str, fields: dict[str, str]) -> None:
        super().__init__()
        self.entry = entry
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        extra = "".join(f"{k}={field(v)} " for k, v in self.fields.items() if v)
        msg = escape(record.getMessage())
        line = (f"{when} level={field(record.levelname.lower())} op={field(self.entry)} {extra}"
                f'logger={field(record.name)} msg="{msg}"')
        if record.exc_info:
            line += " exc=" + field(self.formatException(record.exc_info).splitlines()[-1])
        return line


def setup(entry: str, *, verbose: bool = False, **fields: str) -> logging.Logger:
    """Install one formatter on the root logger (idempotent per process)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = _KeyValue(entry, {k: str(v) for k, v in fields.items()})
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = os.environ.get(ENV_LOG_FILE, DEFAULT_LOG_FILE)
    if path:
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)  # io-seam: exempt (log directory)
            handlers.append(logging.FileHandler(path, encoding="utf-8"))
        except OSError as exc:  # logging must never stop a Prolog
            print(f"sifoverlay: cannot log to {path}: {exc}", file=sys.stderr)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logging.getLogger(f"sifoverlay.slurm.{entry}")


def set_fields(**fields: str) -> None:
    """Add fields (e.g. image=) to every following line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _KeyValue):
            handler.formatter.fields.update({k: str(v) for k, v in fields.items()})
