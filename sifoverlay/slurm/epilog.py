"""Slurm Epilog (slurm.conf ``Epilog=``, via slurm_plugin/hooks/epilog): unmount,
reconcile, release — and ALWAYS exit 0.

slurmd runs the Epilog after every kind of job end it sees (completion, scancel,
scancel -s KILL, time limit, a batch shell killed from outside; after a slurmd restart
for jobs that ended while it was down). A failing Epilog drains the node, so a failed
reconcile is logged, its session and lease are left for the sweeper, and metrics record
it (when prometheus-client is installed and the textfile directory exists): the sync in
the events textfile (jobend), the job end in `sifoverlay_slurm.prom` (`write_metrics`,
names from sifoverlay.metrics.names). The steps are in `jobend.finish_job`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Final

from sifoverlay.errors import SifOverlayError

from .config import SlurmConfig, load_config
from .jobend import JobEndOutcome, finish_job, metrics_dir

__all__ = ["TEXTFILE_NAME", "main", "run", "write_metrics"]

log = logging.getLogger(__name__)

TEXTFILE_NAME: Final = "sifoverlay_slurm.prom"


def write_metrics(outcome: JobEndOutcome, config: SlurmConfig) -> bool:
    """Write the node's Slurm gauges (names.SLURM_*) to `metrics_dir()/sifoverlay_slurm.prom`,
    if prometheus-client is installed and the directory exists. True when written."""
    directory = metrics_dir()
    if directory is None:
        return False
    try:
        from prometheus_client import CollectorRegistry, Gauge

        from sifoverlay.engine import sessions
        from sifoverlay.metrics import names, textfile
    except ImportError as exc:
        log.debug("no textfile metrics: %s", exc)
        return False
    registry = CollectorRegistry()

    def gauge(spec: Any) -> Gauge:  # a names.MetricSpec: name, help and labels from the table
        return Gauge(spec.name, spec.help, list(spec.labels), registry=registry)

    gauge(names.SLURM_JOB_END).labels(result=outcome.result).set_to_current_time()
    gauge(names.SLURM_JOB_END_FAILED).set(0 if outcome.ok else 1)
    gauge(names.SLURM_OPEN_SESSIONS).set(len(sessions.open_sessions(config.journal_dir)))
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
    outcome = finish_job(job_id, config, reason="epilog")  # counts its sync in the events textfile
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
