"""`recording(directory, op)`: count one engine call in the events textfile, for callers
that must not depend on prometheus-client being installed (the CLI, Slurm hooks).

    with recording(args.textfile_dir, "sync") as rec:
        rec.outcome = engine.sync(image)

On success `rec.outcome` is recorded; on an exception the exception is (and re-raised).
Nothing happens when neither `directory` nor $SIFOVERLAY_TEXTFILE_DIR is set; a missing
prometheus-client or an unwritable directory is logged, never raised. This module
imports nothing heavy, so `sifoverlay overlay sync` stays fast without metrics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

log = logging.getLogger(__name__)

ENV_TEXTFILE_DIR: Final = "SIFOVERLAY_TEXTFILE_DIR"


class Recording:
    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: Any = None


def _record(directory: str, op: str, outcome: Any, seconds: float) -> None:
    try:
        from .events import record_result
    except ImportError as exc:
        log.warning("--textfile-dir %s: metrics need prometheus-client (%s)", directory, exc)
        return
    record_result(directory, op, outcome, seconds=seconds if isinstance(outcome, BaseException) else None)


@contextmanager
def recording(directory: str | os.PathLike[str] | None, op: str) -> Iterator[Recording]:
    target = os.fspath(directory) if directory is not None else os.environ.get(ENV_TEXTFILE_DIR) or None
    rec = Recording()
    start = time.monotonic()
    try:
        yield rec
    except Exception as exc:
        if target is not None:
            _record(target, op, exc, time.monotonic() - start)
        raise
    if target is not None and rec.outcome is not None:
        _record(target, op, rec.outcome, time.monotonic() - start)
