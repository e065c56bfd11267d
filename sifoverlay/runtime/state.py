"""Per-job runtime state: ``<base_dir>/<job_id>/state.json``, so that a teardown run by
another process (Epilog, sweeper, `sifoverlay exec` after a crash) knows what was set up.

Every mount step is recorded BEFORE it is attempted (status "planned") and updated once
it is up (helper pid + start time, loop device). A crash at any point therefore leaves a
record that names everything that may exist; teardown treats each step as "maybe there"
and also scans /proc/self/mountinfo for anything under the job directory.

Directory layout of one job (all names fixed, so teardown never has to trust the record
for paths):  layer.<n>/  ext3/  scratch/  rootfs/  log/  state.json
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sifoverlay.errors import SifOverlayError, UsageError
from sifoverlay.fsio import REAL_IO, FileIO

STATE_FILE = "state.json"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}$")


@dataclass(frozen=True, slots=True)
class Step:
    """One mount (or loop attachment) of an assembled rootfs, in setup order."""

    kind: str  # "fuse" | "kernel" | "tmpfs"
    name: str  # "layer.0", "ext3", "scratch", "rootfs"
    target: str  # the mount point
    status: str = "planned"  # "planned" | "mounted"
    pid: int | None = None  # FUSE daemon (foreground child) pid
    pid_start: int | None = None  # its /proc start time, against pid reuse
    loop: str | None = None  # /dev/loopN for kernel mounts (autoclear)


@dataclass(frozen=True, slots=True)
class JobState:
    job_id: str
    image: str
    image_dev: int
    image_ino: int
    mode: str  # "fuse" | "kernel"
    writable: bool
    uid: int
    gid: int
    created: float
    steps: tuple[Step, ...] = field(default_factory=tuple)
    version: int = 1

    def with_step(self, step: Step) -> JobState:
        """Add `step`, or replace the step of the same name."""
        kept = tuple(s for s in self.steps if s.name != step.name)
        if len(kept) == len(self.steps):
            return replace(self, steps=self.steps + (step,))
        return replace(self, steps=tuple(step if s.name == step.name else s for s in self.steps))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, path: str) -> JobState:
        try:
            data: dict[str, Any] = json.loads(raw)
            steps = tuple(Step(**s) for s in data.pop("steps", []))
            return cls(steps=steps, **data)
        except (ValueError, TypeError) as exc:
            raise StateError(path, f"unreadable runtime state: {exc}") from None


class StateError(SifOverlayError):
    """The runtime state record of a job is unreadable (teardown falls back to a scan)."""


def check_job_id(job_id: str) -> str:
    job = str(job_id)
    if not _JOB_ID.match(job):
        raise UsageError(None, f"job id {job!r} is not usable as a directory name (allowed: letters, digits, ._:@+-)")
    return job


def job_dir(base_dir: str | os.PathLike[str], job_id: str) -> str:
    return os.path.join(os.path.abspath(os.fspath(base_dir)), check_job_id(job_id))


def save(base_dir: str | os.PathLike[str], state: JobState, *, io: FileIO = REAL_IO) -> None:
    io.write_file_atomic(os.path.join(job_dir(base_dir, state.job_id), STATE_FILE), state.to_json(), mode=0o644)


def load(base_dir: str | os.PathLike[str], job_id: str) -> JobState | None:
    path = os.path.join(job_dir(base_dir, job_id), STATE_FILE)
    try:
        with open(path, "rb") as fh:
            return JobState.from_json(fh.read(), path)
    except FileNotFoundError:
        return None


def new_state(job_id: str, image: str, st: os.stat_result, *, mode: str, writable: bool, uid: int, gid: int) -> JobState:
    return JobState(check_job_id(job_id), image, st.st_dev, st.st_ino, mode, writable, uid, gid, time.time())


def user_base_dir() -> str:
    """Runtime directory of an unprivileged `sifoverlay exec`: $XDG_RUNTIME_DIR/sifoverlay/jobs,
    else /tmp/sifoverlay-<uid>/jobs (created 0700; refused when somebody else owns it)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    top = os.path.join(xdg, "sifoverlay") if xdg else f"/tmp/sifoverlay-{os.geteuid()}"
    try:
        os.mkdir(top, 0o700)  # io-seam: exempt (the user's own runtime directory)
    except FileExistsError:
        pass
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise UsageError(top, "runtime directory is not a directory of ours (set $XDG_RUNTIME_DIR or --base-dir)")
    return os.path.join(top, "jobs")


def job_ids(base_dir: str | os.PathLike[str]) -> list[str]:
    """Job directories present under base_dir (whatever their state), sorted."""
    try:
        names = os.listdir(base_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _JOB_ID.match(n) and os.path.isdir(os.path.join(base_dir, n)))
