"""Is a Slurm job still alive? One small interface, two backends, chosen automatically.

* `PyslurmJobState`: pyslurm's `Job.load`. Used only when pyslurm imports AND its
  major.minor equals the running Slurm's: pyslurm X.Y builds and runs only against
  Slurm X.Y, and no registry these nodes reach serves a Slurm that any pyslurm on PyPI
  supports (docs/slurm.md, "pyslurm").
* `SlurmCliJobState`: ``squeue --json --jobs ID`` (exists since 22.05), falling back to
  ``scontrol show job -o ID``. Works wherever the Slurm client commands do.

`is_alive` answers True (the job may still touch its image: pending, running,
completing...), False (finished, or purged from slurmctld), or None (cannot tell:
slurmctld unreachable). Callers act only on False.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "ALIVE_STATES",
    "JobState",
    "PyslurmJobState",
    "SlurmCliJobState",
    "running_slurm_version",
    "select_backend",
]

log = logging.getLogger(__name__)

# Base states and state flags (as squeue/scontrol print them) of a job that is not done:
# COMPLETING covers a job whose Epilog is still running, so a sweeper never races it.
ALIVE_STATES: Final = frozenset({
    "PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED",
    "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
    "RESV_DEL_HOLD", "SPECIAL_EXIT", "POWER_UP_NODE", "UPDATE_DB",
})
_INVALID_JOB: Final = re.compile(r"invalid job id", re.IGNORECASE)
_SLURM_BIN_DIRS: Final = ("/usr/bin", "/usr/local/bin", "/opt/slurm/bin")

Runner = Callable[..., subprocess.CompletedProcess[str]]


@runtime_checkable
class JobState(Protocol):
    name: str

    def is_alive(self, job_id: str) -> bool | None: ...


def _find_tool(name: str) -> str | None:
    # Prolog/Epilog run without PATH: look in the usual places too.
    found = shutil.which(name)
    if found:
        return found
    for directory in _SLURM_BIN_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _states_alive(states: list[str]) -> bool:
    return any(state.upper() in ALIVE_STATES for state in states)


class SlurmCliJobState:
    """Job state from the Slurm client commands."""

    name = "cli"

    def __init__(self, *, timeout: float = 20.0, runner: Runner = subprocess.run) -> None:
        self.squeue = _find_tool("squeue")
        self.scontrol = _find_tool("scontrol")
        self.timeout = timeout
        self._run = runner

    def _call(self, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        try:
            return self._run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("job state: %s failed: %s", argv[0], exc)
            return None

    def _from_squeue(self, job_id: str) -> bool | None:
        if self.squeue is None:
            return None
        done = self._call([self.squeue, "--json", "--jobs", str(job_id)])
        if done is None:
            return None
        if done.returncode != 0:
            return False if _INVALID_JOB.search(done.stderr + done.stdout) else None
        try:
            reply: dict[str, Any] = json.loads(done.stdout)
            jobs: list[dict[str, Any]] = reply.get("jobs", [])
            errors = reply.get("errors") or []
        except (ValueError, AttributeError):
            return None
        if errors:
            # squeue --json exits 0 with an "errors" list (and no jobs) when slurmctld is
            # unreachable: that must read as "cannot tell", never as "job is gone".
            text = json.dumps(errors)
            return False if _INVALID_JOB.search(text) else None
        mine = [j for j in jobs if str(j.get("job_id")) == str(job_id)]
        if not mine:
            return False  # purged after MinJobAge
        states: list[str] = []
        for job in mine:
            state = job.get("job_state")
            states += state if isinstance(state, list) else [str(state)]
        return _states_alive(states)

    def _from_scontrol(self, job_id: str) -> bool | None:
        if self.scontrol is None:
            return None
        done = self._call([self.scontrol, "show", "job", "-o", str(job_id)])
        if done is None:
            return None
        if done.returncode != 0:
            return False if _INVALID_JOB.search(done.stderr + done.stdout) else None
        match = re.search(r"\bJobState=(\S+)", done.stdout)
        if match is None:
            return None
        return _states_alive(match.group(1).split("+"))

    def is_alive(self, job_id: str) -> bool | None:
        answer = self._from_squeue(job_id)
        if answer is None:
            answer = self._from_scontrol(job_id)
        log.debug("job state (cli): job %s alive=%s", job_id, answer)
        return answer


def running_slurm_version(runner: Runner = subprocess.run) -> str | None:
    """'22.05.8' from ``scontrol --version`` ('slurm 22.05.8'), or None."""
    scontrol = _find_tool("scontrol")
    if scontrol is None:
        return None
    try:
        done = runner([scontrol, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                      text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)", done.stdout)
    return match.group(1) if match else None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


class PyslurmJobState:
    """Job state through pyslurm (>= 23.x API: `pyslurm.Job.load`)."""

    name = "pyslurm"

    def __init__(self, module: Any) -> None:
        self._pyslurm = module

    @classmethod
    def load(cls, slurm_version: str | None) -> tuple[PyslurmJobState | None, str]:
        """(backend, reason): the backend when pyslurm imports and matches the running
        Slurm, else None and why not."""
        try:
            import pyslurm  # type: ignore[import-not-found]
        except ImportError as exc:
            return None, f"pyslurm is not importable ({exc})"
        version = str(getattr(pyslurm, "__version__", "") or "")
        if not version:
            return None, "pyslurm has no __version__"
        if slurm_version is None:
            return None, "the running Slurm version is unknown (scontrol --version failed)"
        if _major_minor(version) != _major_minor(slurm_version):
            return None, f"pyslurm {version} does not match Slurm {slurm_version} (pyslurm X.Y needs Slurm X.Y)"
        if not hasattr(pyslurm, "Job") or not hasattr(pyslurm.Job, "load"):
            return None, f"pyslurm {version} has no Job.load"
        return cls(pyslurm), f"pyslurm {version} matches Slurm {slurm_version}"

    def is_alive(self, job_id: str) -> bool | None:
        try:
            job = self._pyslurm.Job.load(int(job_id))
        except Exception as exc:  # pyslurm.RPCError carries Slurm's message
            if _INVALID_JOB.search(str(exc)):
                return False
            log.warning("job state (pyslurm): job %s: %s", job_id, exc)
            return None
        state = str(getattr(job, "state", "") or "")
        return _states_alive(state.replace(",", "+").split("+")) if state else None


def select_backend(prefer: str | None = None, *, slurm_version: str | None = None) -> JobState:
    """pyslurm when it imports and matches the running Slurm, else the CLI; `prefer`
    ("cli" | "pyslurm") forces one (pyslurm falls back to the CLI with a warning).
    The choice and its reason are logged."""
    if prefer not in (None, "cli", "pyslurm"):
        raise ValueError(f"unknown job state backend {prefer!r}")
    if prefer != "cli":
        backend, reason = PyslurmJobState.load(slurm_version or running_slurm_version())
        if backend is not None:
            log.info("job state backend: pyslurm (%s)", reason)
            return backend
        (log.warning if prefer == "pyslurm" else log.info)("job state backend: cli (%s)", reason)
    else:
        log.info("job state backend: cli (asked for)")
    return SlurmCliJobState()
