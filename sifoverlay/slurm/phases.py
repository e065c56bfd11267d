"""Per-job timing records of the Prolog, the Epilog and the reconcile worker: where the
seconds of a job's start and end go (authorize, lease, mounts; unmount, quiesce, hash,
commit). One JSON object per line in ``timing.jsonl`` beside the Slurm log
(logsetup.DEFAULT_LOG_FILE's directory, or $SIFOVERLAY_SLURM_LOG's), appended with one
write so lines of concurrent jobs never interleave; bench/job_overhead.py reads it.

    {"entry": "epilog", "job": "42", "host": "n1", "mode": "rw", "result": "pending",
     "total": 0.041, "phases": {"unmount": 0.021, "verify": 0.001, "handoff": 0.012}}

Timing never changes an outcome: a record that cannot be written is logged and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Final

__all__ = ["TIMING_FILE", "PhaseClock", "records_of_job", "timing_path"]

log = logging.getLogger(__name__)

TIMING_FILE: Final = "timing.jsonl"


def timing_path(env: Mapping[str, str] | None = None) -> str | None:
    """Where the records go: beside the Slurm log; None when the log is off."""
    from .logsetup import DEFAULT_LOG_FILE, ENV_LOG_FILE

    log_file = (os.environ if env is None else env).get(ENV_LOG_FILE, DEFAULT_LOG_FILE)
    return os.path.join(os.path.dirname(log_file), TIMING_FILE) if log_file else None


class PhaseClock:
    """Laps of one entry point for one job: `lap(name)` ends the phase that started at the
    previous lap (or at creation); `add` merges phases timed elsewhere (the engine's sync)."""

    def __init__(self, entry: str, job_id: str) -> None:
        self.entry = entry
        self.job_id = job_id
        self.began = self._mark = time.monotonic()
        self.phases: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """A moment, not a phase: seconds since the start (the Prolog's exit, while its
        detached mounter goes on)."""
        self.marks[name] = time.monotonic() - self.began

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def add(self, phases: Mapping[str, float], *, within: str | None = None) -> None:
        """Merge `phases`; when they were timed inside the lap `within`, that lap keeps only
        what they do not account for."""
        for name, seconds in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds
        if within is not None and within in self.phases:
            self.phases[within] = max(0.0, self.phases[within] - sum(phases.values()))
            if self.phases[within] < 0.0005:
                del self.phases[within]

    def record(self, *, result: str, mode: str | None = None, path: str | None = None) -> dict[str, object]:
        """Write the record (and a summary line to the log); returns it."""
        total = time.monotonic() - self.began
        record: dict[str, object] = {
            "entry": self.entry, "job": self.job_id, "host": socket.gethostname(), "mode": mode, "result": result,
            "time": round(time.time(), 3), "total": round(total, 6),
            "phases": {name: round(seconds, 6) for name, seconds in self.phases.items()},
        }
        if self.marks:
            record["marks"] = {name: round(seconds, 6) for name, seconds in self.marks.items()}
        log.info("job %s: %s %s in %.3fs (%s)", self.job_id, self.entry, result, total,
                 " ".join(f"{k}={v:.3f}" for k, v in self.phases.items()))
        target = path if path is not None else timing_path()
        if target:
            line = (json.dumps(record, sort_keys=True) + "\n").encode()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(target, flags, 0o644)  # io-seam: exempt (root's own log directory, not an image)
                try:
                    os.write(fd, line)  # io-seam: exempt (one append: lines never interleave)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("timing record not written to %s: %s", target, exc)
        return record


def records_of_job(path: str | os.PathLike[str], job_id: str) -> dict[str, dict[str, object]]:
    """The last record of each entry ("prolog", "epilog", "worker", ...) of `job_id` in the
    timing file at `path` (tests, benchmarks)."""
    found: dict[str, dict[str, object]] = {}
    with open(path, encoding="utf-8") as fh:  # no-path-open: ok (root's own timing log, read-only)
        for line in fh:
            record = json.loads(line)
            if record.get("job") == job_id:
                found[str(record["entry"])] = record
    return found
