"""What slurmd tells the Prolog and Epilog about a job, from their environment.

They run as root with no PATH and no HOME; the job comes as SLURM_JOB_ID, SLURM_JOB_UID,
SLURM_JOB_GID, SLURM_JOB_USER, SLURM_JOB_WORK_DIR, and the plugin's value as
SPANK_OCI_SIF_OVERLAY=PATH:MODE (set with spank_job_control_setenv where the job was
submitted; the plugin always appends the mode).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sifoverlay.errors import UsageError

__all__ = ["CONTROL_VAR", "JobEnv", "parse_request"]

CONTROL_VAR: Final = "SPANK_OCI_SIF_OVERLAY"


def parse_request(value: str, default_mode: str) -> tuple[str, str]:
    """'PATH[:rw|:ro]' -> (PATH, mode). Same rules as the plugin's option."""
    path, mode = value, default_mode
    for suffix in ("rw", "ro"):
        if value.endswith(":" + suffix) and len(value) > 3:
            path, mode = value[: -len(suffix) - 1], suffix
            break
    if not path.startswith("/"):
        raise UsageError(path, "--oci-sif-overlay needs an absolute path")
    return path, mode


@dataclass(frozen=True, slots=True)
class JobEnv:
    job_id: str
    uid: int
    gid: int
    user: str | None
    image: str | None  # as requested; None: the job did not ask for an image
    mode: str | None
    work_dir: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, default_mode: str = "rw") -> JobEnv:
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id.isdigit():
            raise UsageError(None, f"SLURM_JOB_ID={job_id!r} is not a job id (not run by slurmd?)")
        try:
            uid = int(env.get("SLURM_JOB_UID", ""))
            gid = int(env.get("SLURM_JOB_GID", ""))
        except ValueError:
            raise UsageError(None, f"job {job_id}: SLURM_JOB_UID/SLURM_JOB_GID missing or not numbers") from None
        value = env.get(CONTROL_VAR, "")
        image, mode = parse_request(value, default_mode) if value else (None, None)
        return cls(job_id, uid, gid, env.get("SLURM_JOB_USER") or None, image, mode,
                   env.get("SLURM_JOB_WORK_DIR") or None)
