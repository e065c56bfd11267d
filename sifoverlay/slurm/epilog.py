"""Slurm Epilog (slurm.conf ``Epilog=``, via slurm_plugin/hooks/epilog): unmount,
reconcile, release — and ALWAYS exit 0.

slurmd runs the Epilog after every kind of job end it sees (completion, scancel,
scancel -s KILL, time limit, a batch shell killed from outside; after a slurmd restart
for jobs that ended while it was down). A failing Epilog drains the node, so a failed
reconcile is logged, its session and lease are left for the sweeper, and a metric
records it (`sifoverlay.metrics.textfile`, when installed). The steps are in
`jobend.finish_job`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

from sifoverlay.errors import SifOverlayError

from .config import SlurmConfig, load_config
from .jobend import JobEndOutcome, finish_job

__all__ = ["TEXTFILE_NAME", "main", "run", "write_metrics"]

log = logging.getLogger(__name__)

ENV_TEXTFILE_DIR: Final = "SIFOVERLAY_TEXTFILE_DIR"
DEFAULT_TEXTFILE_DIR: Final = "/var/lib/prometheus/node-exporter"
TEXTFILE_NAME: Final = "sifoverlay_slurm.prom"


def write_metrics(outcome: JobEndOutcome, config: SlurmConfig) -> bool:
    """Write the node's Slurm textfile metrics, if sifoverlay.metrics is installed and
    the textfile directory exists. Returns True when a file was written."""
    directory = os.environ.get(ENV_TEXTFILE_DIR, DEFAULT_TEXTFILE_DIR)
    if not os.path.isdir(directory):
        return False
    try:
        from prometheus_client import CollectorRegistry, Gauge

        from sifoverlay.engine import sessions
        from sifoverlay.metrics import textfile  # written by the metrics engineer
    except ImportError as exc:
        log.debug("no textfile metrics: %s", exc)
        return False
    registry = CollectorRegistry()
    last = Gauge("sifoverlay_slurm_job_end_timestamp_seconds",
                 "When this node last handled the end of a job that used an image.",
                 ["result"], registry=registry)
    last.labels(result=outcome.result).set_to_current_time()
    Gauge("sifoverlay_slurm_job_end_failed", "1 when the last job end on this node failed to reconcile.",
          registry=registry).set(0 if outcome.ok else 1)
    Gauge("sifoverlay_slurm_open_sessions", "Job sessions open on this node (running jobs + work for the sweeper).",
          registry=registry).set(len(sessions.open_sessions(config.journal_dir)))
    try:
        textfile.write(directory, registry, TEXTFILE_NAME)
    except Exception:
        log.exception("writing textfile metrics to %s failed", directory)
        return False
    return True


def run(env: dict[str, str] | None = None, *, config: SlurmConfig | None = None) -> JobEndOutcome | None:
    env = dict(os.environ) if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        log.error("SLURM_JOB_ID=%r: not run by slurmd?", job_id)
        return None
    if config is None:
        try:
            config = load_config(env=env)
        except SifOverlayError as exc:
            log.error("sifoverlay is misconfigured on this node: %s (job %s left for the sweeper)", exc, job_id)
            return None
    from . import logsetup

    logsetup.set_fields(job=job_id, image=env.get("SPANK_OCI_SIF_OVERLAY", ""))
    outcome = finish_job(job_id, config, reason="epilog")
    if outcome.result != "nothing":
        write_metrics(outcome, config)
    return outcome


def main(argv: list[str] | None = None) -> int:
    from . import logsetup

    logsetup.setup("epilog", verbose="-v" in (argv or sys.argv[1:]), job=os.environ.get("SLURM_JOB_ID", ""))
    try:
        run()
    except BaseException:  # never drain the node
        log.exception("epilog crashed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
