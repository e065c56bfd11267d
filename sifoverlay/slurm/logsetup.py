"""Logging for the Slurm entry points (Prolog, Epilog, sweeper): key=value lines with
the job and image on every line, to stderr and to a log file (slurmd drops a Prolog's
output). Library modules only use logging.getLogger(__name__)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

__all__ = ["DEFAULT_LOG_FILE", "setup"]

DEFAULT_LOG_FILE: Final = "/var/log/sifoverlay/slurm.log"
ENV_LOG_FILE: Final = "SIFOVERLAY_SLURM_LOG"


class _KeyValue(logging.Formatter):
    def __init__(self, entry: str, fields: dict[str, str]) -> None:
        super().__init__()
        self.entry = entry
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items() if v)
        msg = " ".join(record.getMessage().split())
        line = f'{when} level={record.levelname.lower()} op={self.entry} {extra} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info).splitlines()[-1])
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
