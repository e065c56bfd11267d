"""The multi-node rule for images (docs/slurm.md "Multi-node rules"): one ext3 is never
mounted read-write on two nodes, so ``:rw`` is for single-node jobs only; ``:ro`` mounts on
every node of the job.

job_submit.lua refuses a multi-node rw job at submit time when the site runs it; the Prolog
checks again on every node, before authorization, lease or mount: the allocation's node list
(SLURM_JOB_NODELIST) and, for heterogeneous jobs, their components (slurmctld, through
scontrol), because each component is a job of its own with its own node list.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Final

from sifoverlay.errors import SifOverlayError

__all__ = ["RULE", "check_rw_allowed", "count_hosts", "wait_for_ending_holders"]

log = logging.getLogger(__name__)

RULE: Final = ("rw needs a single-node job (one ext3 is never mounted read-write on two nodes); "
               "use -N1, or :ro for a multi-node job")
_SCONTROL: Final = ("/usr/bin/scontrol", "/usr/local/bin/scontrol")


def _split_top(text: str) -> list[str]:
    """'a[1-3,5],b' -> ['a[1-3,5]', 'b']: commas outside brackets only."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _range_size(spec: str) -> int:
    total = 0
    for item in spec.split(","):
        lo, dash, hi = item.partition("-")
        total += int(hi) - int(lo) + 1 if dash else 1
    return total


def count_hosts(hostlist: str) -> int:
    """Number of hosts in a Slurm hostlist expression ('n[1-3],gpu07' -> 4)."""
    count = 0
    for part in _split_top(hostlist.strip()):
        size = 1
        rest = part
        while "[" in rest:
            head, _, tail = rest.partition("[")
            spec, _, rest = tail.partition("]")
            size *= _range_size(spec)
        count += size
    return count


def _job_fields(job_id: str, env: Mapping[str, str]) -> dict[str, str] | None:
    """`scontrol show job -o ID` as a dict (None: no scontrol, or it could not answer)."""
    tool = next((t for t in _SCONTROL if os.access(t, os.X_OK)), None)
    if tool is None:
        return None
    child_env = {"PATH": "/usr/bin:/bin", **({"SLURM_CONF": env["SLURM_CONF"]} if env.get("SLURM_CONF") else {})}
    try:
        out = subprocess.run([tool, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30,
                             env=child_env, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("job %s: cannot ask slurmctld: %s", job_id, exc)
        return None
    return dict(word.partition("=")[::2] for word in out.split())


def _het_components(job_id: str, env: Mapping[str, str]) -> int:
    """How many components the job's heterogeneous job has (1: not heterogeneous)."""
    het = (_job_fields(job_id, env) or {}).get("HetJobIdSet")
    return count_hosts("x[" + het + "]") if het else 1


def check_rw_allowed(image: str, job_id: str, env: Mapping[str, str] | None = None) -> None:
    """Raise the rule's refusal when a rw job spans more than one node."""
    env = os.environ if env is None else env
    nodes = count_hosts(env.get("SLURM_JOB_NODELIST", "") or env.get("SLURM_NODELIST", ""))
    if nodes > 1:
        raise SifOverlayError(image, f"{RULE} (job {job_id} has {nodes} nodes)")
    if "SLURM_JOB_NODELIST" not in env:  # not run by slurmd: no allocation to ask about
        return
    components = _het_components(job_id, env)
    if components > 1:
        raise SifOverlayError(image, f"{RULE} (job {job_id} is one of {components} components of a "
                                     "heterogeneous job)")


# The one job state in which a holder's lease is about to go: Slurm has ended the job
# (and given its license to the next writer, see docs/slurm.md "Writers queue") and keeps
# it COMPLETING until every node's Epilog, which reconciles the image and releases the
# lease, has finished. Any other end state means the Epilog is over: a lease still held
# then was LEFT by it (a failed reconcile, for the sweeper), and waiting cannot help.
_EPILOG_RUNNING: Final = "COMPLETING"


def _job_state(job_id: str, env: Mapping[str, str]) -> str | None:
    if not job_id.isdigit() or not os.path.exists(env.get("SLURM_CONF", "/etc/slurm/slurm.conf")):
        return None
    return (_job_fields(job_id, env) or {}).get("JobState")


def wait_for_ending_holders(holders: Callable[[], list[tuple[str, str]]], *, timeout: float,
                            env: Mapping[str, str] | None = None, poll: float = 0.5,
                            ending: Callable[[str], bool] | None = None) -> bool:
    """Wait while the image is held only by Slurm jobs that slurmctld has already ended
    and whose end is being handled: the job is COMPLETING (its Epilog runs), or `ending(job)`
    says a process (the reconcile worker of an async job end) is ending it now.
    `holders()` -> [(source, job_id), ...] of the current lease holders. True when none is
    left; False at once when a holder is live, not a Slurm job, or ended with nobody ending
    it (its Epilog failed and left the lease to the sweeper), or when `timeout` passes."""
    env = os.environ if env is None else env
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        current = holders()
        if not current:
            if waited:
                log.info("the image's previous holder released it: going on")
            return True
        for source, job_id in current:
            if ending is not None and ending(job_id):
                # its Epilog, reconcile worker or sweeper holds the job-end lock: done within
                # its hash time. Any source: a job end that took a lease of its own (its expired
                # one won back, or a sweeper's takeover: slurm/reclaim.py) holds it as "sync"
                continue
            state = _job_state(job_id, env) if source == "slurm" else None
            if state is None or state.split("+")[0] != _EPILOG_RUNNING:
                if state is not None and waited:
                    log.warning("job %s is %s and its Epilog left the image held: not waiting longer", job_id, state)
                return False
        if time.monotonic() >= deadline:
            log.warning("image still held by ended jobs %s after %.0fs", [j for _, j in current], timeout)
            return False
        if not waited:
            log.info("image held by ended jobs %s whose Epilog is running: waiting", [j for _, j in current])
            waited = True
        time.sleep(poll)
