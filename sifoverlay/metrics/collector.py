"""A custom prometheus_client Collector: turns the scanner's latest snapshot into metric
families when Prometheus scrapes (client_python "Custom Collectors").

The scrape never waits for hashing. It reads the snapshot of the last scan, and scans
synchronously only when there is none yet or it is older than `max_age` seconds (so a
collector used without a background scan loop still reads state at scrape time).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from sifoverlay import __version__

from . import names
from .scan import Scanner, Snapshot


def gauge(spec: names.MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def counter(spec: names.MetricSpec) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def build_info() -> InfoMetricFamily:
    spec = names.BUILD_INFO
    family = InfoMetricFamily(spec.name, spec.help, labels=[])
    family.add_metric([], {"version": __version__, "python": platform.python_version()})
    return family


def snapshot_families(snap: Snapshot) -> list[Metric]:
    """The state families of one snapshot (pure: no I/O)."""
    state = gauge(names.OVERLAY_STATE)
    last = gauge(names.OVERLAY_LAST_RECONCILE)
    size = gauge(names.OVERLAY_SIZE)
    free = gauge(names.OVERLAY_FREE)
    inodes = gauge(names.OVERLAY_FREE_INODES)
    slots = gauge(names.SIF_FREE_DESCRIPTORS)
    revisions = counter(names.IMAGE_REVISIONS)
    errors = 0
    for report in snap.images:
        for value in names.STATES:
            state.add_metric([report.image, value], 1.0 if report.state == value else 0.0)
        if report.error is not None:
            errors += 1
            continue
        if report.last_reconcile is not None:
            last.add_metric([report.image], report.last_reconcile)
        if report.overlay_size is not None:
            size.add_metric([report.image], float(report.overlay_size))
        if report.free_bytes is not None:
            free.add_metric([report.image], float(report.free_bytes))
        if report.free_inodes is not None:
            inodes.add_metric([report.image], float(report.free_inodes))
        if report.free_descriptors is not None:
            slots.add_metric([report.image], float(report.free_descriptors))
        if report.revisions is not None:
            revisions.add_metric([report.image], float(report.revisions))
    images = gauge(names.EXPORTER_IMAGES)
    images.add_metric(["ok"], float(len(snap.images) - errors))
    images.add_metric(["error"], float(errors))
    singles = []
    for spec, value in (
        (names.JOURNAL_PENDING, snap.journal_pending),
        (names.JOURNAL_OLDEST_AGE, snap.journal_oldest_age),
        (names.LEASES_HELD, snap.leases_held),
        (names.LEASES_STALE, snap.leases_stale),
        (names.EXPORTER_SCAN_DURATION, snap.seconds),
        (names.EXPORTER_LAST_SCAN, snap.finished),
        (names.EXPORTER_VERIFY_QUEUE, snap.verify_queue),
    ):
        family = gauge(spec)
        family.add_metric([], float(value))
        singles.append(family)
    return [state, last, size, free, inodes, slots, revisions, images, *singles]


class OverlayCollector(Collector):
    """Registered once per registry; each test builds its own CollectorRegistry."""

    def __init__(self, scanner: Scanner, *, max_age: float = 60.0) -> None:
        self.scanner = scanner
        self.max_age = max_age

    def snapshot(self) -> Snapshot:
        snap = self.scanner.latest
        if snap is None or time.time() - snap.finished > self.max_age:
            snap = self.scanner.scan()
        return snap

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_families(self.snapshot())
        hashed = counter(names.HASHED_BYTES)
        hashed.add_metric(["verify"], float(self.scanner.verified_bytes))
        yield hashed
        yield build_info()

    def describe(self) -> Iterator[Metric]:
        # Families without samples: lets registry.register() check names without a scan.
        for spec in (names.OVERLAY_STATE, names.OVERLAY_LAST_RECONCILE, names.OVERLAY_SIZE, names.OVERLAY_FREE,
                     names.OVERLAY_FREE_INODES, names.SIF_FREE_DESCRIPTORS,
                     names.EXPORTER_IMAGES, names.JOURNAL_PENDING, names.JOURNAL_OLDEST_AGE, names.LEASES_HELD,
                     names.LEASES_STALE, names.EXPORTER_SCAN_DURATION, names.EXPORTER_LAST_SCAN,
                     names.EXPORTER_VERIFY_QUEUE):
            yield gauge(spec)
        yield counter(names.HASHED_BYTES)
        yield counter(names.IMAGE_REVISIONS)
        yield build_info()
