"""Counters of what short-lived processes did (CLI verbs, Slurm Prolog/Epilog/sweeper),
kept in a node_exporter textfile so they outlive the process.

The textfile IS the counter store: each event reads `<dir>/sifoverlay_events.prom`, adds
its increments, and writes it back (textfile.write: temp + fsync + rename), all under an
exclusive flock on `<dir>/.sifoverlay_events.prom.lock` so two processes finishing at once
both count. Counters therefore only reset when an admin deletes the file, which
Prometheus's rate()/increase() handle like a process restart.

Recording a metric never fails the operation it describes: errors are logged and
`record*` returns None.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from sifoverlay.fsio import REAL_IO, FileIO

from . import names, textfile
from .collector import build_info

log = logging.getLogger(__name__)

DEFAULT_NAME: Final = "sifoverlay_events.prom"
from .record import ENV_TEXTFILE_DIR  # noqa: E402 - one name for the env variable
LOCK_WAIT: Final = 10.0  # seconds; a stuck writer must not hang an Epilog
_BOUNDS: Final = tuple(floatToGoString(b) for b in names.DURATION_BUCKETS) + ("+Inf",)


@dataclass(slots=True)
class Totals:
    """The cumulative values of the events textfile."""

    reconciles: dict[str, float] = field(default_factory=lambda: dict.fromkeys(names.RECONCILE_RESULTS, 0.0))
    buckets: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_BOUNDS, 0.0))
    duration_sum: float = 0.0
    hashed_bytes: float = 0.0
    recoveries: dict[str, float] = field(default_factory=lambda: dict.fromkeys(names.RECOVERY_OUTCOMES, 0.0))
    stale_leases_broken: float = 0.0
    last_event: float = 0.0

    @classmethod
    def from_families(cls, families: Iterable[Metric]) -> Totals:
        totals = cls()
        for family in families:
            for sample in family.samples:
                totals._absorb(sample.name, sample.labels, sample.value)
        return totals

    def _absorb(self, sample: str, labels: Mapping[str, str], value: float) -> None:
        if sample == names.RECONCILES.sample_name and "result" in labels:
            self.reconciles[labels["result"]] = value
        elif sample == names.RECONCILE_DURATION.name + "_bucket" and labels.get("le") in self.buckets:
            self.buckets[labels["le"]] = value
        elif sample == names.RECONCILE_DURATION.name + "_sum":
            self.duration_sum = value
        elif sample == names.HASHED_BYTES.sample_name and labels.get("source") == "reconcile":
            self.hashed_bytes = value
        elif sample == names.RECOVERIES.sample_name and "outcome" in labels:
            self.recoveries[labels["outcome"]] = value
        elif sample == names.STALE_LEASES_BROKEN.sample_name:
            self.stale_leases_broken = value
        elif sample == names.LAST_EVENT.name:
            self.last_event = value

    def observe_duration(self, seconds: float) -> None:
        for bound, value in zip(names.DURATION_BUCKETS, _BOUNDS):
            if seconds <= bound:
                self.buckets[value] += 1
        self.buckets["+Inf"] += 1
        self.duration_sum += seconds

    def families(self) -> list[Metric]:
        reconciles = CounterMetricFamily(names.RECONCILES.name, names.RECONCILES.help, labels=["result"])
        for result, value in self.reconciles.items():
            reconciles.add_metric([result], value)
        spec = names.RECONCILE_DURATION
        duration = HistogramMetricFamily(spec.name, spec.help, buckets=[(b, self.buckets[b]) for b in _BOUNDS],
                                         sum_value=self.duration_sum)
        hashed = CounterMetricFamily(names.HASHED_BYTES.name, names.HASHED_BYTES.help, labels=["source"])
        hashed.add_metric(["reconcile"], self.hashed_bytes)
        recoveries = CounterMetricFamily(names.RECOVERIES.name, names.RECOVERIES.help, labels=["outcome"])
        for outcome, value in self.recoveries.items():
            recoveries.add_metric([outcome], value)
        stale = CounterMetricFamily(names.STALE_LEASES_BROKEN.name, names.STALE_LEASES_BROKEN.help,
                                    value=self.stale_leases_broken)
        last = GaugeMetricFamily(names.LAST_EVENT.name, names.LAST_EVENT.help, value=self.last_event)
        return [reconciles, duration, hashed, recoveries, stale, last, build_info()]


@dataclass(frozen=True, slots=True)
class Increment:
    """What one process adds. Label values outside the closed sets are refused."""

    reconciles: Mapping[str, int] = field(default_factory=dict)
    durations: tuple[float, ...] = ()
    hashed_bytes: int = 0
    recoveries: Mapping[str, int] = field(default_factory=dict)
    stale_leases_broken: int = 0

    def apply(self, totals: Totals) -> None:
        for result, n in self.reconciles.items():
            if result not in totals.reconciles:
                raise ValueError(f"unknown reconcile result {result!r}")
            totals.reconciles[result] += n
        for seconds in self.durations:
            totals.observe_duration(seconds)
        totals.hashed_bytes += self.hashed_bytes
        for outcome, n in self.recoveries.items():
            if outcome not in totals.recoveries:
                raise ValueError(f"unknown recovery outcome {outcome!r}")
            totals.recoveries[outcome] += n
        totals.stale_leases_broken += self.stale_leases_broken
        totals.last_event = time.time()


def _lock(directory: str, name: str, io: FileIO) -> int:
    fd = io.open(os.path.join(directory, f".{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{directory}/{name}: lock held for more than {LOCK_WAIT:.0f} s") from None
            time.sleep(0.05)


def apply(directory: str | os.PathLike[str], increment: Increment, *, name: str = DEFAULT_NAME,
          io: FileIO = REAL_IO) -> Totals:
    """Add `increment` to the textfile under its lock; raises on any problem."""
    directory = os.fspath(directory)
    textfile.target_path(directory, name)  # validate before creating the lock file
    fd = _lock(directory, name, io)
    try:
        totals = Totals.from_families(textfile.read(directory, name))
        increment.apply(totals)
        textfile.write(directory, totals.families(), name, io=io)
        return totals
    finally:
        os.close(fd)  # releases the flock


def record(directory: str | os.PathLike[str] | None, increment: Increment, *, name: str = DEFAULT_NAME,
           io: FileIO = REAL_IO) -> str | None:
    """`apply`, but never raising: returns the textfile path, or None when nothing was
    written (no directory configured, or an error, which is logged)."""
    if directory is None:
        directory = os.environ.get(ENV_TEXTFILE_DIR) or None
    if directory is None:
        return None
    try:
        apply(directory, increment, name=name, io=io)
    except Exception as exc:  # metrics must never fail the operation they describe
        log.warning("cannot record metrics in %s/%s: %s", os.fspath(directory), name, exc)
        return None
    return os.path.join(os.fspath(directory), name)


def sync_increment(outcome: Any, *, seconds: float | None = None) -> Increment:
    """The increment of one `engine.sync` call: its SyncResult, or the exception it
    raised (ImageBusy -> result "busy", anything else -> "failed")."""
    from sifoverlay.errors import ImageBusy

    if isinstance(outcome, BaseException):
        result = "busy" if isinstance(outcome, ImageBusy) else "failed"
        return Increment(reconciles={result: 1}, durations=(seconds,) if seconds is not None else ())
    took = outcome.seconds if seconds is None else seconds
    return Increment(reconciles={outcome.action: 1}, durations=(took,), hashed_bytes=int(outcome.bytes_hashed))


def recover_increment(outcomes: Any) -> Increment:
    """The increment of one `engine.recover` call: its RecoverOutcome list (or one), or
    the exception it raised (counted as one "failed")."""
    if isinstance(outcomes, BaseException):
        return Increment(recoveries={"failed": 1})
    if not isinstance(outcomes, (list, tuple)):
        outcomes = [outcomes]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    return Increment(recoveries=counts)


def record_result(directory: str | os.PathLike[str] | None, op: str, outcome: Any, *,
                  seconds: float | None = None, name: str = DEFAULT_NAME, io: FileIO = REAL_IO) -> str | None:
    """Record the outcome of one engine call in the events textfile (never raises).

    op "sync": `outcome` is a SyncResult or the exception sync raised;
    op "recover": a list of RecoverOutcome or the exception;
    op "break-stale": a bool (engine.lease.break_stale's return value) or int count.
    `directory` None -> $SIFOVERLAY_TEXTFILE_DIR, else nothing is recorded.
    """
    try:
        if op == "sync":
            increment = sync_increment(outcome, seconds=seconds)
        elif op == "recover":
            increment = recover_increment(outcome)
        elif op == "break-stale":
            increment = Increment(stale_leases_broken=int(outcome) if not isinstance(outcome, BaseException) else 0)
        else:
            raise ValueError(f"unknown op {op!r}")
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("cannot record metrics for %s: %s", op, exc)
        return None
    return record(directory, increment, name=name, io=io)
