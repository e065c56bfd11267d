"""The `who` of a revision written at job end (engine.history.Who): job id, cluster, user,
node and how the job ended.

The Epilog's environment names job, user and cluster (SLURM_JOB_ID, SLURM_JOB_UID,
SLURM_JOB_USER, SLURM_CLUSTER_NAME); the sweeper has none of it and asks Slurm. How the job
ended comes from slurmctld (`scontrol show job -o`): during the Epilog the job is still
COMPLETING, so the state is derived from its ExitCode `status:signal` - a signal means it
was killed (scancel, time limit, OOM), a non-zero status that it failed. Anything Slurm
cannot tell stays None: the revision is written regardless (R11: never fail the Epilog).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping
from typing import Any

from .jobstate import _find_tool

log = logging.getLogger(__name__)

_FIELD = re.compile(r"(\w+)=(\S*)")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "DEADLINE", "BOOT_FAIL"})


def exit_state_of(fields: Mapping[str, str]) -> str | None:
    """'COMPLETED', 'FAILED (exit 3)', 'KILLED (signal 9)', or a final Slurm state
    with the exit code ('CANCELLED (signal 15)'), from `scontrol show job -o` fields."""
    state = fields.get("JobState", "").upper()
    code = fields.get("ExitCode", "")
    status, _, signal = code.partition(":")
    how = None
    if signal.isdigit() and int(signal):
        how = f"signal {int(signal)}"
    elif status.isdigit() and int(status):
        how = f"exit {int(status)}"
    if state in FINAL_STATES:
        return f"{state} ({how})" if how else state
    if not code:
        return None
    if how is None:
        return "COMPLETED"
    return f"KILLED ({how})" if how.startswith("signal") else f"FAILED ({how})"


def scontrol_fields(argv: list[str], timeout: float = 10.0) -> dict[str, str]:
    tool = _find_tool("scontrol")
    if tool is None:
        return {}
    try:
        proc = subprocess.run([tool, *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("scontrol %s: %s", " ".join(argv), exc)
        return {}
    if proc.returncode != 0:
        return {}
    return dict(_FIELD.findall(proc.stdout))


def cluster_name() -> str | None:
    tool = _find_tool("scontrol")
    if tool is None:
        return None
    try:
        proc = subprocess.run([tool, "show", "config"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=10.0, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^ClusterName\s*=\s*(\S+)", proc.stdout, re.MULTILINE)
    return match.group(1) if match else None


def who_for_job(job_id: str, uid: int, *, reason: str, env: Mapping[str, str] | None = None) -> Any:
    """engine.history.Who for the end of `job_id` (run by `reason`: epilog or sweeper)."""
    from sifoverlay.engine.history import Who, user_name

    env = os.environ if env is None else env
    try:
        fields = scontrol_fields(["show", "job", "-o", str(job_id)])
        in_env = env.get("SLURM_JOB_ID") == str(job_id)
        user = env.get("SLURM_JOB_USER") if in_env else None
        return Who(
            job_id=str(job_id),
            cluster=(env.get("SLURM_CLUSTER_NAME") if in_env else None) or cluster_name(),
            uid=int(uid), user=user or user_name(int(uid)) or fields.get("UserId", "").split("(")[0] or None,
            node=(env.get("SLURMD_NODENAME") if in_env else None) or os.uname().nodename,
            exit_state=exit_state_of(fields), via=reason,
        )
    except Exception:  # noqa: BLE001 - the revision is written with what is known
        log.exception("job %s: could not describe the job for its revision", job_id)
        return Who(job_id=str(job_id), uid=int(uid), node=os.uname().nodename, via=reason)
