"""The operator's Prometheus metrics (prefix `sifoverlay_operator_`).

They live in this normally imported module, not in the operator's entry script: `kopf run
operator/main.py` re-executes that script on every run, and a metric defined there twice
in one process raises "Duplicated timeseries". The HTTP server starts once per port.
Labels are bounded sets (results, reasons); object names go to status and events instead.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from sifoverlay import __version__

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "sifoverlay_operator_reconciles_total",
    "Reconciles run by the operator, by engine action (reconciled, noop, replayed) or error.",
    ["result"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram(
    "sifoverlay_operator_reconcile_duration_seconds",
    "Wall time of one reconcile (engine.sync) run by the operator.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900), registry=REGISTRY)
WORKLOADS_ENDED = Counter(
    "sifoverlay_operator_workloads_ended_total",
    "Workloads whose end the operator observed, by how they ended.",
    ["result"], registry=REGISTRY)
LEASE_WAITS = Counter(
    "sifoverlay_operator_lease_waits_total",
    "Times an OverlayJob found its image's Lease held by another one.", registry=REGISTRY)
HANDLER_ERRORS = Counter(
    "sifoverlay_operator_handler_errors_total",
    "Handler errors, by kind: temporary (retried) or permanent.", ["kind"], registry=REGISTRY)
DRIFTED = Gauge(
    "sifoverlay_operator_drifted_overlayjobs",
    "Finished OverlayJobs whose image overlay no longer matches its manifest (last check).",
    registry=REGISTRY)
STATUS_CONFLICTS = Counter(
    "sifoverlay_operator_status_conflicts_total",
    "Status writes refused with 409 Conflict: retried (only metadata had changed) or redo (the step is redone).",
    ["outcome"], registry=REGISTRY)
PHASE_SINCE = Gauge(
    "sifoverlay_operator_phase_oldest_timestamp_seconds",
    "Per non-terminal phase, when the OverlayJob that has been in it longest entered it (unix time).",
    ["phase"], registry=REGISTRY)
LEASES_AFTER_FINISH = Gauge(
    "sifoverlay_operator_leases_held_after_finish",
    "Image Leases still held by an OverlayJob that already finished (last drift check).",
    registry=REGISTRY)
BUILD = Info("sifoverlay_operator_build", "Version of the operator.", registry=REGISTRY)
BUILD.info({"version": __version__})

_drifted: set[tuple[str, str]] = set()
_drift_lock = threading.Lock()
_servers: dict[int, object] = {}
_server_lock = threading.Lock()


def set_drift(namespace: str, name: str, drifted: bool) -> None:
    with _drift_lock:
        (_drifted.add if drifted else _drifted.discard)((namespace, name))
        DRIFTED.set(len(_drifted))


_phases: dict[tuple[str, str], tuple[str, float]] = {}
_stale_leases: set[tuple[str, str]] = set()
_TERMINAL = ("Succeeded", "Failed")


def observe_phase(namespace: str, name: str, phase: str, since: float) -> None:
    """Record that an OverlayJob entered `phase` at `since` (its phase-age alert input)."""
    with _drift_lock:
        if phase in _TERMINAL:
            _phases.pop((namespace, name), None)
        elif _phases.get((namespace, name), ("", 0.0))[0] != phase:
            _phases[(namespace, name)] = (phase, since)
        _publish_phases()


def _publish_phases() -> None:
    oldest: dict[str, float] = {}
    for phase, since in _phases.values():
        oldest[phase] = min(since, oldest.get(phase, since))
    for phase in ("Pending", "Waiting", "Running", "Reconciling"):
        if phase in oldest:
            PHASE_SINCE.labels(phase).set(oldest[phase])
        else:
            PHASE_SINCE.remove(phase) if (phase,) in PHASE_SINCE._metrics else None  # noqa: SLF001


def set_lease_after_finish(namespace: str, name: str, held: bool) -> None:
    with _drift_lock:
        (_stale_leases.add if held else _stale_leases.discard)((namespace, name))
        LEASES_AFTER_FINISH.set(len(_stale_leases))


def forget(namespace: str, name: str) -> None:
    set_drift(namespace, name, False)
    set_lease_after_finish(namespace, name, False)
    with _drift_lock:
        _phases.pop((namespace, name), None)
        _publish_phases()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the /metrics endpoint on `port` unless this process already serves it."""
    if port <= 0:
        return
    with _server_lock:
        if port in _servers:
            return
        _servers[port] = start_http_server(port, addr=addr, registry=REGISTRY)
        log.info("serving metrics on %s:%d", addr, port)
