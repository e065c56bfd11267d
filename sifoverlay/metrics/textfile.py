"""node_exporter textfile collector output: `<dir>/<name>.prom`, written atomically.

node_exporter (`--collector.textfile.directory`) reads only `*.prom` files. We render the
text exposition format (no timestamps, which the textfile collector rejects), write it to
a hidden temp name in the same directory, fsync it, rename it over the target and fsync
the directory: a scrape sees the old file or the new one, never half of one, and a crash
does not leave an empty file behind (prometheus_client's write_to_textfile renames but
does not fsync). All writes go through the `io` seam.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from sifoverlay.errors import UsageError
from sifoverlay.fsio import REAL_IO, FileIO

SUFFIX: Final = ".prom"
MAX_TEXTFILE: Final = 16 << 20  # a textfile of ours is a few KiB; refuse to parse giants


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def target_path(directory: str | os.PathLike[str], name: str) -> str:
    """`<directory>/<name>` after checking both (UsageError naming the problem)."""
    directory = os.fspath(directory)
    if not name.endswith(SUFFIX) or os.sep in name or name.startswith("."):
        raise UsageError(os.path.join(directory, name), f"textfile name must be a plain file name ending in {SUFFIX}")
    if not os.path.isdir(directory):
        raise UsageError(directory, "textfile directory does not exist")
    return os.path.join(directory, name)


def render(source: Collector | Iterable[Metric]) -> bytes:
    """Text exposition format 0.0.4 of a registry, a collector or a list of families."""
    if not hasattr(source, "collect"):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(source))  # type: ignore[arg-type]
        source = registry
    return generate_latest(source)  # type: ignore[arg-type]


def write(
    directory: str | os.PathLike[str],
    source: Collector | Iterable[Metric],
    name: str,
    *,
    io: FileIO = REAL_IO,
) -> str:
    """Write `source` (registry, collector or metric families) as `<directory>/<name>`
    atomically and durably. Returns the path written."""
    path = target_path(directory, name)
    io.write_file_atomic(path, render(source), mode=0o644, durable=True)
    return path


def read(directory: str | os.PathLike[str], name: str) -> list[Metric]:
    """The families in an existing textfile ([] when absent); an unparsable file is
    reported as UsageError naming it (we never overwrite what we cannot read back)."""
    path = target_path(directory, name)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXTFILE + 1)
    except FileNotFoundError:
        return []
    if len(raw) > MAX_TEXTFILE:
        raise UsageError(path, f"textfile is larger than {MAX_TEXTFILE} bytes")
    try:
        return list(text_string_to_metric_families(raw.decode("utf-8")))
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        raise UsageError(path, f"not a Prometheus text exposition file: {exc}") from exc


def record_result(directory: str | os.PathLike[str] | None, op: str, outcome: object, **kwargs: object) -> str | None:
    """Shortcut to `sifoverlay.metrics.events.record_result` (counts one engine call's
    outcome in `<directory>/sifoverlay_events.prom`; never raises)."""
    from .events import record_result as _record_result

    return _record_result(directory, op, outcome, **kwargs)  # type: ignore[arg-type]
