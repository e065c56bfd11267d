"""Who changed an image, and the revision each commit records (ocisif.history stores it).

Every writing verb (create, sync, seal, resize, compact) takes a `who`: the Slurm Epilog
and sweeper fill in the job (id, cluster, user, node, exit state), the Kubernetes operator
its workload, the CLI the calling process. The revision is planned together with the OCI
objects and written in the same journaled commit, so it exists exactly when the commit
does.

Time: `SOURCE_DATE_EPOCH` when set (reproducible runs, the crash tests compare images
byte for byte), else the clock. Cap: `SIFOVERLAY_HISTORY_REVISIONS` (default 1000).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sifoverlay.ocisif.history import DEFAULT_CAP

CAP_ENV = "SIFOVERLAY_HISTORY_REVISIONS"
EPOCH_ENV = "SOURCE_DATE_EPOCH"
OPERATIONS = ("create", "sync", "seal", "resize", "compact", "recover")


@dataclass(frozen=True, slots=True)
class Who:
    """Who a commit is made for. `via`: the component that ran it (cli, epilog, sweeper,
    operator); `exit_state`: how the job ended (Slurm: COMPLETED, FAILED, CANCELLED...)."""

    job_id: str | None = None
    cluster: str | None = None
    uid: int | None = None
    user: str | None = None
    node: str | None = None
    exit_state: str | None = None
    via: str | None = None

    @classmethod
    def current(cls, *, via: str = "cli", env: Mapping[str, str] | None = None, **given: Any) -> Who:
        """The calling process (inside a Slurm job: that job), overridden by `given`."""
        env = os.environ if env is None else env
        uid = os.getuid()
        base: dict[str, Any] = {
            "job_id": env.get("SLURM_JOB_ID") or None, "cluster": env.get("SLURM_CLUSTER_NAME") or None,
            "uid": uid, "user": user_name(uid), "node": os.uname().nodename, "via": via,
        }
        base.update({k: v for k, v in given.items() if v is not None})
        return cls(**base)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def history_cap(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    text = env.get(CAP_ENV, "")
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    return DEFAULT_CAP


def commit_time(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    text = env.get(EPOCH_ENV, "")
    return int(text) if text.strip().isdigit() else int(time.time())


@dataclass(frozen=True, slots=True)
class RevisionDraft:
    """What the caller knows before planning; the plan adds the manifest digests."""

    op: str
    who: Who
    old_overlay: str | None
    new_overlay: str | None
    bytes_hashed: int
    detail: Mapping[str, Any] | None = None

    def revision(self, *, old_manifest: str | None, new_manifest: str) -> dict[str, Any]:
        when = commit_time()
        rev: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
            "op": self.op,
            "overlay": {"old": self.old_overlay, "new": self.new_overlay},
            "manifest": {"old": old_manifest, "new": new_manifest},
            "bytes_hashed": int(self.bytes_hashed),
            "who": self.who.as_dict(),
        }
        if self.detail:
            rev["detail"] = dict(self.detail)
        return rev


def draft(op: str, who: Who | None, *, old_overlay: str | None, new_overlay: str | None, bytes_hashed: int,
          detail: Mapping[str, Any] | None = None) -> RevisionDraft:
    return RevisionDraft(op, who if who is not None else Who.current(), old_overlay, new_overlay, bytes_hashed, detail)


def read_log(path: str | os.PathLike[str], *, image_fd: int | None = None,
             expect_identity: tuple[int, int] | None = None) -> Any:
    """The revision history of an image (ocisif.history.History), read through one checked
    descriptor (the caller's `image_fd`, else the path opened with open_image_checked).
    Works on any SIF: an image without history has an empty one."""
    from sifoverlay.errors import SifFormatError
    from sifoverlay.ocisif import history as image_history
    from sifoverlay.sif.load import SifFile

    from .status import _checked_fd

    image = os.fspath(path)
    try:
        fd = _checked_fd(image, image_fd, expect_identity)
    except OSError as exc:
        raise SifFormatError(image, f"cannot open: {exc.strerror}", errno=exc.errno) from exc
    with SifFile.from_fd(fd, image) as sif:
        return image_history.read(sif)
