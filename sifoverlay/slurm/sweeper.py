"""The sweeper (`sifoverlay recover --slurm`, or ``python -m sifoverlay.slurm.sweeper``):
finish the jobs whose end nobody handled.

The Epilog handles every job end slurmd sees. What is left — the node died or rebooted,
the Epilog timed out or was killed, slurmd was down past the job's end, a reconcile
failed — stays as an open job session in the journal directory. For every open Slurm
session of this host whose job slurmctld reports as over (`jobstate`: pyslurm when it
matches the running Slurm, else the CLI), the sweeper runs the Epilog's own sequence
(`jobend.finish_job`: teardown leftovers, recover + reconcile inside the job's lease,
release the lease, finish the session). Jobs that are pending/running/completing, and
jobs whose state cannot be read, are left alone. Mount leftovers and plugin records of
dead jobs without a session are removed too.

Once a job is finished cleanly (its own lease released), a writer lease on its image that
is stale by the engine's rule (holder gone, expired) is broken, so the next job or sync
does not have to. Metrics (events textfile of `jobend.metrics_dir()`, or --textfile-dir):
every sync (jobend), every stale lease broken, and the outcomes of `recover --slurm`.

Cluster sweep (issue 13; the state directory, with leases, journal and sessions, is
shared by all nodes): the sessions of OTHER hosts are looked at too, from the controller
or any node. Such a session is taken over only when BOTH hold: slurmctld says its job is
over or its node is DOWN (Slurm's opinion: a cut-off node's job is NODE_FAIL while it
still runs), AND the lease of that job on that host is stale by its own heartbeat
(engine/leasestale.py: expired + grace; the holder's keeper renews it while the node
lives, even cut off from the controller). Then the stale lease is broken and the image is
recovered from the shared journal and reconciled under this node's lease
(`jobend.finish_foreign`), and the session closed. A live heartbeat always wins: the
node that holds it ends the job itself once it is back (exactly one job end).

Run it from a systemd timer (slurm_plugin/systemd/) and once at slurmd start.
Exit status: 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from sifoverlay.errors import SifOverlayError

from . import records
from .config import SlurmConfig, load_config
from .jobend import JobEndOutcome, finish_job, metrics_dir, record_event
from .jobstate import JobState, select_backend

__all__ = ["SweepReport", "add_arguments", "break_stale_lease", "main", "recover_slurm", "run_from_args", "sweep"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SweepReport:
    backend: str
    outcomes: list[JobEndOutcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (job id, why)
    stale_broken: list[str] = field(default_factory=list)  # images whose stale writer lease we broke

    @property
    def failed(self) -> list[JobEndOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def as_dict(self) -> dict[str, object]:
        return {"backend": self.backend, "outcomes": [o.as_dict() for o in self.outcomes],
                "skipped": [{"job_id": j, "why": w} for j, w in self.skipped],
                "stale_broken": list(self.stale_broken)}


def _leftover_jobs(config: SlurmConfig) -> set[str]:
    jobs = set(records.list_jobs(config.records_dir))
    try:
        from sifoverlay import runtime

        jobs |= {str(j) for j in runtime.find_leftovers(config.mounts_dir)}
    except ImportError:
        log.warning("sifoverlay.runtime is not installed: mount leftovers not checked")
    except Exception:
        log.exception("listing mount leftovers in %s failed", config.mounts_dir)
    return {j for j in jobs if j.isdigit()}


def break_stale_lease(image: str, textfile_dir: str | None) -> bool:
    """engine.lease.break_stale on `image`, counted (op "break-stale") when it broke one.
    Never raises: a sweep must go on to the next job."""
    from sifoverlay.engine import lease

    try:
        broke = lease.break_stale(image)
    except Exception:
        log.exception("%s: breaking a stale lease failed", image)
        return False
    if broke:
        record_event(textfile_dir, "break-stale", True)
    return broke


def sweep(config: SlurmConfig, jobstate: JobState, *, host: str | None = None,
          textfile_dir: str | None = None, cluster: bool = True,
          node_down: Callable[[str], bool | None] | None = None, io: Any = None,
          workers: int | None = None) -> SweepReport:
    """Finish this host's Slurm jobs that are over, and (`cluster`) other hosts' whose
    holder is gone (module docstring); `textfile_dir` None: `metrics_dir()`.
    `node_down(host)`: is the node DOWN in slurmctld (None: cannot tell); default scontrol.
    `io`: the FileIO of every job end's sync (`recover --slurm` passes io_from_env(): the
    crash hook of the tests). `workers`: how many of this host's job ends run at once
    (default `sweep_workers()`; 1: one after the other)."""
    from sifoverlay.engine import statedir

    with statedir.using(config.state_dir):
        return _sweep(config, jobstate, host=host, textfile_dir=textfile_dir, cluster=cluster,
                      node_down=node_down or node_is_down, io=io, workers=workers or sweep_workers())


def sweep_workers() -> int:
    """One job end per core, at most 4: hashing (hashlib, preadv) releases the GIL, and more
    parallel readers than that only make a shared filesystem seek."""
    return max(1, min(4, os.cpu_count() or 1))


def _finish_all(due: list[tuple[str, str | None]], config: SlurmConfig, textfile_dir: str | None, io: Any,
                workers: int) -> list[JobEndOutcome]:
    """finish_job for every (job, image) of `due`, `workers` at a time on threads; the job
    ends of one image one after the other (in order), never two on one image at once.
    Outcomes in the order of `due`. Threads share the process's state directory
    (statedir.using is process-wide): every job end here uses the same config.state_dir."""
    from concurrent.futures import ThreadPoolExecutor

    groups: dict[str | None, list[int]] = {}
    for index, (_, image) in enumerate(due):
        groups.setdefault(image if image is not None else f"#{index}", []).append(index)
    outcomes: list[JobEndOutcome | None] = [None] * len(due)

    def run(indexes: list[int]) -> None:
        for index in indexes:
            outcomes[index] = finish_job(due[index][0], config, reason="sweeper", textfile_dir=textfile_dir,
                                         **_io(io))

    if workers <= 1 or len(groups) <= 1:
        for indexes in groups.values():
            run(indexes)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(groups)), thread_name_prefix="sweep") as pool:
            for done in [pool.submit(run, indexes) for indexes in groups.values()]:
                done.result()
    return [o for o in outcomes if o is not None]


def node_is_down(node: str) -> bool | None:
    """slurmctld's opinion of `node`: True when DOWN (or FAIL), None when unknown."""
    import subprocess

    from .jobstate import _find_tool

    scontrol = _find_tool("scontrol")
    if scontrol is None:
        return None
    try:
        done = subprocess.run([scontrol, "show", "node", "-o", node], capture_output=True, text=True, timeout=20,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    for word in done.stdout.split():
        if word.startswith("State="):
            flags = set(word[len("State="):].upper().replace("*", "").split("+"))
            return bool(flags & {"DOWN", "FAIL", "FAILING", "POWERED_DOWN", "POWER_DOWN"})
    return None


def _sweep_foreign(session: Any, config: SlurmConfig, jobstate: JobState, report: SweepReport,
                   textfile_dir: str | None, node_down: Callable[[str], bool | None], io: Any = None) -> None:
    """Another host's session: take it over only when Slurm says its job is over or its
    node DOWN, AND its lease's heartbeat says the holder is gone."""
    from sifoverlay.engine import lease
    from sifoverlay.engine.leasestale import break_file

    from .jobend import finish_foreign

    job, key, token = session.job_id, session.details.get("key"), session.details.get("token")
    if not key:
        report.skipped.append((job, f"session of host {session.host} without a lease key (older Prolog)"))
        return
    try:
        held = [lease.inspect(key=str(key), state_dir=config.state_dir),
                *lease.readers(key=str(key), state_dir=config.state_dir)]
    except OSError as exc:
        report.skipped.append((job, f"lease unreadable: {exc}"))
        return
    mine = next((h for h in held if h is not None and (h.token == token if token else
                                                        (h.job_id == job and h.host == session.host))), None)
    if mine is not None and mine.is_alive(grace=config.lease_grace):
        report.skipped.append((job, f"host {session.host} still heartbeats its lease "
                                    f"({time.time() - mine.heartbeat:.1f} s ago)"))
        return
    over = jobstate.is_alive(job) is False
    down = node_down(session.host) is True if not over else False
    if not (over or down):
        report.skipped.append((job, f"lease of host {session.host} is stale but Slurm says job and node live"))
        return
    if mine is None and held[0] is not None and (held[0].job_id, held[0].host) == (job, session.host) \
            and held[0].is_alive(grace=config.lease_grace):
        # Its node's own job end won back its expired lease and reconciles under a new one
        # (slurm/reclaim.py); the session's token is being forgotten right now.
        report.skipped.append((job, f"host {session.host}'s own job end holds the image"))
        return
    if mine is None:
        # Nobody holds it for this job any more (broken by a job that took over, or released
        # by its node's Epilog just now): the image is not ours to reconcile. Close the session.
        from sifoverlay.engine import sessions

        sessions.finish(config.journal_dir, job, f"superseded (lease gone), closed by {socket.gethostname()}",
                        host=session.host)
        report.outcomes.append(JobEndOutcome(job, session.image, "fenced", "lease",
                                             f"host {session.host}: lease already gone; session closed"))
        return
    if session.mode == "rw":
        writing = still_written(session)
        if writing is not None:
            # Frozen (hung) or unreachable, not dead: its FUSE daemon still holds the ext3's
            # write lock. Taking over would mean two writers; its keeper fences it on wake-up.
            why = (f"image {session.image} held by a frozen or unreachable holder: host {session.host}'s lease "
                   f"is stale (heartbeat {time.time() - mine.heartbeat:.1f} s ago, Slurm: "
                   f"{'job over' if over else 'node DOWN'}) but {writing}; not taken over")
            log.warning("job %s: %s", job, why)
            report.skipped.append((job, why))
            return
    log.warning("job %s: host %s is gone (Slurm: %s; heartbeat %.1f s ago): taking over %s", job, session.host,
                "job over" if over else "node DOWN", time.time() - mine.heartbeat, session.image)
    if not break_file(mine.path, mine.inode):
        report.skipped.append((job, "the stale lease changed while breaking it (renewed?)"))
        return
    record_event(textfile_dir, "break-stale", True)
    report.stale_broken.append(session.image)
    report.outcomes.append(finish_foreign(session, config, textfile_dir=textfile_dir, **_io(io)))


def still_written(session: Any) -> str | None:
    """What still writes the session's image although its lease is stale (a frozen or cut-off
    holder whose FUSE daemon lives on: its write lock on the ext3 region, or on a shared
    kernel its daemon), or None. Probed without waiting (F_OFD_GETLK, /proc), through a
    checked fd of the inode the Prolog authorized; a lock is never waited for."""
    from sifoverlay.engine import leaselock, quiesce, statedir

    dev, ino = session.details.get("dev"), session.details.get("ino")
    try:
        fd = statedir.open_image_checked(session.image, expect_identity=(int(dev), int(ino))
                                         if dev is not None and ino is not None else None)
    except (OSError, SifOverlayError):
        return None  # gone or replaced: finish_foreign reports it
    try:
        region = leaselock.overlay_region(session.image, fd)
        found = quiesce.find_activity(session.image, *region, fd=fd, owners=(session.uid,))
    except (OSError, SifOverlayError) as exc:
        return f"its use cannot be read ({exc})"
    finally:
        os.close(fd)
    writers = [a.detail for a in found if a.writer and a.kind != "lease"]
    return "; ".join(writers) if writers else None


def _io(io: Any) -> dict[str, Any]:
    return {} if io is None else {"io": io}


def _sweep(config: SlurmConfig, jobstate: JobState, *, host: str | None, textfile_dir: str | None,
           cluster: bool = True, node_down: Callable[[str], bool | None] = node_is_down,
           io: Any = None, workers: int = 1) -> SweepReport:
    from sifoverlay.engine import sessions

    host = host or socket.gethostname()
    textfile_dir = textfile_dir if textfile_dir is not None else metrics_dir()
    report = SweepReport(backend=jobstate.name)
    seen: set[str] = set()
    due: list[tuple[str, str | None]] = []  # this host's jobs to end: (job, image)
    for session in sessions.open_sessions(config.journal_dir):
        seen.add(session.job_id)
        if session.source != "slurm":
            report.skipped.append((session.job_id, f"source {session.source}"))
            continue
        if session.host != host:
            if cluster:
                _sweep_foreign(session, config, jobstate, report, textfile_dir, node_down, io)
            else:
                report.skipped.append((session.job_id, f"session of host {session.host}"))
            continue
        alive = jobstate.is_alive(session.job_id)
        if alive is None:
            report.skipped.append((session.job_id, "job state unknown (slurmctld unreachable?)"))
            continue
        if alive:
            report.skipped.append((session.job_id, "job still alive"))
            continue
        log.warning("job %s is over but its session on %s is open: finishing it", session.job_id, session.image)
        due.append((session.job_id, session.image))
    for job_id in sorted(_leftover_jobs(config) - seen, key=int):
        if jobstate.is_alive(job_id) is False:
            due.append((job_id, None))
    report.outcomes.extend(_finish_all(due, config, textfile_dir, io, workers))
    _break_stale_after(report, config, textfile_dir)
    return report


def _break_stale_after(report: SweepReport, config: SlurmConfig, textfile_dir: str | None) -> None:
    """Break stale writer leases on the images of jobs finished cleanly in this sweep. Not
    after a failed finish (that job's own lease must stay until it is reconciled), and not
    while another session is open on the image (its job may be between heartbeats)."""
    from sifoverlay.engine import sessions

    busy = {s.image for s in sessions.open_sessions(config.journal_dir)}
    failed = {o.image for o in report.outcomes if not o.ok}
    done = {o.image for o in report.outcomes if o.ok and o.result not in ("nothing", "refused", "image-missing", "busy")}
    for image in sorted(i for i in done - failed - busy if i is not None):
        if break_stale_lease(image, textfile_dir):
            report.stale_broken.append(image)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugstack", metavar="FILE", help="plugstack.conf with the sifoverlay line "
                        "(default: beside $SLURM_CONF, else /etc/slurm/plugstack.conf)")
    parser.add_argument("--backend", choices=("auto", "cli", "pyslurm"), default="auto",
                        help="job state backend (default auto: pyslurm when it matches the running Slurm)")


def run_from_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Shared by `sifoverlay recover --slurm` and `python -m sifoverlay.slurm.sweeper`."""
    config = load_config(getattr(args, "plugstack", None))
    backend = select_backend(None if args.backend == "auto" else args.backend)
    report = sweep(config, backend)
    out = sys.stdout if out is None else out
    if getattr(args, "json", False):
        print(json.dumps(report.as_dict(), sort_keys=True), file=out)
    else:
        for o in report.outcomes:
            from .logsetup import escape  # user-chosen paths never break a line (finding 9)

            print(f"job {o.job_id}: {o.result} ({escape(str(o.image))}){': ' + escape(o.detail) if o.detail else ''}",
                  file=out)
        if not report.outcomes:
            print(f"nothing to sweep ({len(report.skipped)} open session(s) left alone)", file=out)
    return 1 if report.failed else 0


def recover_slurm(args: argparse.Namespace, *, recover: Any, io: Any, out: Any = None) -> int:
    """`sifoverlay recover --slurm [IMAGE...] [--journal-dir DIR] [--json]`: sweep this node's
    finished Slurm jobs, then recover interrupted operations as plain `recover` does."""
    out = sys.stdout if out is None else out
    config = load_config(getattr(args, "plugstack", None))
    if getattr(args, "journal_dir", None):
        config = replace(config, journal_dir=args.journal_dir)
    backend = select_backend(None if getattr(args, "backend", "auto") == "auto" else args.backend)
    textfile_dir = getattr(args, "textfile_dir", None) or metrics_dir()
    report = sweep(config, backend, textfile_dir=textfile_dir, io=io)
    from sifoverlay.engine import statedir

    try:
        with statedir.using(config.state_dir):
            outcomes = recover(getattr(args, "images", None) or None, journal_dir=config.journal_dir, io=io,
                               grace=config.lease_grace)
    except Exception as exc:
        record_event(textfile_dir, "recover", exc)
        raise
    record_event(textfile_dir, "recover", outcomes)
    if getattr(args, "json", False):
        json.dump({"slurm": report.as_dict(), "outcomes": [o.as_dict() for o in outcomes]}, out, indent=2)
        out.write("\n")
    else:
        for o in report.outcomes:
            out.write(f"job {o.job_id}: {o.result} ({o.image})" + (f": {o.detail}" if o.detail else "") + "\n")
        if not report.outcomes:
            out.write(f"no finished Slurm job to sweep ({len(report.skipped)} open session(s) left alone)\n")
        for r in outcomes:
            out.write(f"{r.image}: {r.outcome}" + (f" ({r.op})" if r.op else "") + f": {r.detail}\n")
    failed = bool(report.failed) or any(r.outcome == "failed" for r in outcomes)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from . import logsetup

    parser = argparse.ArgumentParser(prog="sifoverlay-slurm-sweeper", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logsetup.setup("sweeper", verbose=args.verbose)
    try:
        return run_from_args(args)
    except SifOverlayError as exc:
        log.error("%s", exc.message())
        print(f"sifoverlay: {exc.message()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
