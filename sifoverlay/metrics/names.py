"""Every metric sifoverlay exports, in one table: name, type, help, label names.

Naming follows prometheus.io/docs/practices/naming: one prefix (`sifoverlay_`), base units
(`_seconds`, `_bytes`), `_total` only on counters, `_info` for metadata, `_timestamp_seconds`
for points in time. Label values come from small closed sets (states, results, outcomes)
plus `image`, which is only ever an image an administrator configured for scanning: job
ids, user names and arbitrary paths never become label values (docs/metrics.md).

Counter names here are the family names WITHOUT `_total`: the exposition adds the suffix
to the sample (`sifoverlay_reconciles` -> `sifoverlay_reconciles_total`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PREFIX: Final = "sifoverlay_"

COUNTER: Final = "counter"
GAUGE: Final = "gauge"
HISTOGRAM: Final = "histogram"
INFO: Final = "info"

# The closed label value sets.
STATES: Final = ("clean", "modified", "drift", "in-use", "unknown")  # engine.Status.state
RECONCILE_RESULTS: Final = ("noop", "reconciled", "replayed-and-reconciled", "busy", "failed")
RECOVERY_OUTCOMES: Final = ("rolled-forward", "rolled-back", "completed", "nothing", "failed")
HASH_SOURCES: Final = ("reconcile", "verify")
SCAN_RESULTS: Final = ("ok", "error")
JOB_END_RESULTS: Final = ("reconciled", "noop", "released", "refused", "image-missing", "failed")  # JobEndOutcome
# Seconds: a no-op sync takes milliseconds, a 10 GiB overlay hashes in about a minute.
DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # full family name, prefix included, no `_total`
    type: str
    help: str
    labels: tuple[str, ...] = ()

    @property
    def sample_name(self) -> str:
        """The name PromQL sees for the plain sample (counters get `_total`)."""
        return self.name + "_total" if self.type == COUNTER else self.name


def _spec(name: str, mtype: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(PREFIX + name, mtype, help_text, tuple(labels))


# --- state, read by the exporter's collector at scrape time -------------------------------
OVERLAY_STATE: Final = _spec(
    "overlay_state", GAUGE,
    "Drift state of a scanned image's overlay, one-hot over clean, modified, drift, in-use, unknown.",
    "image", "state")
OVERLAY_LAST_RECONCILE: Final = _spec(
    "overlay_last_reconcile_timestamp_seconds", GAUGE,
    "When the image's overlay digest was last recorded (reconcile or create), Unix time.",
    "image")
OVERLAY_SIZE: Final = _spec(
    "overlay_size_bytes", GAUGE, "Size of the image's ext3 overlay region.", "image")
OVERLAY_FREE: Final = _spec(
    "overlay_free_bytes", GAUGE, "Free bytes in the image's ext3 overlay filesystem (superblock).", "image")
OVERLAY_FREE_INODES: Final = _spec(
    "overlay_free_inodes", GAUGE, "Free inodes in the image's ext3 overlay filesystem (superblock).", "image")
SIF_FREE_DESCRIPTORS: Final = _spec(
    "sif_free_descriptors", GAUGE,
    "Unused descriptor slots of the image's SIF; a sync needs 4 at once (engine/capacity.py).", "image")
IMAGE_REVISIONS: Final = _spec(
    "image_revisions", COUNTER,
    "Sequence number of the image's newest recorded revision (commits: create, sync, seal, resize, compact).",
    "image")
JOURNAL_PENDING: Final = _spec(
    "journal_pending_entries", GAUGE,
    "Unfinished operations in the journal directory (crashed or running create/sync/seal).")
JOURNAL_OLDEST_AGE: Final = _spec(
    "journal_oldest_entry_age_seconds", GAUGE,
    "Age of the oldest unfinished journal entry, 0 when there is none.")
LEASES_HELD: Final = _spec(
    "leases_held", GAUGE, "Scanned images whose writer lease is held by a live holder.")
LEASES_STALE: Final = _spec(
    "leases_stale", GAUGE, "Scanned images whose writer lease is stale (holder gone or expired), not yet broken.")
EXPORTER_IMAGES: Final = _spec(
    "exporter_images", GAUGE, "Images found under the scan paths in the last scan, by scan result.", "result")
EXPORTER_SCAN_DURATION: Final = _spec(
    "exporter_scan_duration_seconds", GAUGE, "Wall time of the last full scan.")
EXPORTER_LAST_SCAN: Final = _spec(
    "exporter_last_scan_timestamp_seconds", GAUGE, "When the last full scan finished, Unix time.")
EXPORTER_VERIFY_QUEUE: Final = _spec(
    "exporter_verify_queue_images", GAUGE, "Images waiting to be hashed by the verify schedule.")
BUILD_INFO: Final = _spec(
    "build", INFO, "sifoverlay version and Python version of the exporting process.", "version", "python")

# --- events, counted by the processes that call the engine ---------------------------------
RECONCILES: Final = _spec(
    "reconciles", COUNTER, "Reconciles (overlay sync) run, by result.", "result")
RECONCILE_DURATION: Final = _spec(
    "reconcile_duration_seconds", HISTOGRAM, "Wall time of one reconcile (overlay sync).")
HASHED_BYTES: Final = _spec(
    "hashed_bytes", COUNTER, "Overlay bytes hashed, by why: reconcile, or the exporter's verify schedule.",
    "source")
RECOVERIES: Final = _spec(
    "recoveries", COUNTER, "Interrupted operations found by recovery, by outcome.", "outcome")
STALE_LEASES_BROKEN: Final = _spec(
    "stale_leases_broken", COUNTER, "Stale writer leases removed by recovery or a new writer.")
LAST_EVENT: Final = _spec(
    "textfile_last_event_timestamp_seconds", GAUGE, "When this textfile last recorded an event, Unix time.")

# --- Slurm Epilog, its own textfile (sifoverlay_slurm.prom), rewritten at every job end ---
SLURM_JOB_END: Final = _spec(
    "slurm_job_end_timestamp_seconds", GAUGE,
    "When this node last handled the end of a job that used an image, Unix time, by result.", "result")
SLURM_JOB_END_FAILED: Final = _spec(
    "slurm_job_end_failed", GAUGE, "1 when the last job end on this node failed to reconcile, else 0.")
SLURM_OPEN_SESSIONS: Final = _spec(
    "slurm_open_sessions", GAUGE, "Job sessions open on this node (running jobs + work for the sweeper).")

ALL: Final[tuple[MetricSpec, ...]] = (
    OVERLAY_STATE, OVERLAY_LAST_RECONCILE, OVERLAY_SIZE, OVERLAY_FREE, OVERLAY_FREE_INODES, SIF_FREE_DESCRIPTORS,
    IMAGE_REVISIONS, JOURNAL_PENDING, JOURNAL_OLDEST_AGE,
    LEASES_HELD, LEASES_STALE, EXPORTER_IMAGES, EXPORTER_SCAN_DURATION, EXPORTER_LAST_SCAN,
    EXPORTER_VERIFY_QUEUE, BUILD_INFO,
    RECONCILES, RECONCILE_DURATION, HASHED_BYTES, RECOVERIES, STALE_LEASES_BROKEN, LAST_EVENT,
    SLURM_JOB_END, SLURM_JOB_END_FAILED, SLURM_OPEN_SESSIONS,
)
BY_NAME: Final = {spec.name: spec for spec in ALL}
