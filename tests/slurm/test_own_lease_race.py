"""A thawed node's own job end against another node's sweeper, on one real lease file
(issue 13, docs/slurm.md "Leases, heartbeats and fencing").

This node's job lost its keeper (frozen or cut off past ttl + grace, then thawed): its
lease record still carries the job's token but has expired past the grace. Its job end
(Epilog or reconcile worker) and the cluster sweeper of another node ("n1": a process in
its own UTS namespace, as on the multi-node test bed) may both want to reconcile the image.
Exactly one may: whoever wins the break of the expired lease (engine/leasestale.break_file,
one rename). The interleaving is forced: the sweep runs to its end while the job end is
held at the point where the race bites (inside its commit; right before its break).
Real images, writes, leases, journal and engine; slurmctld's answers are fixed."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sifoverlay.engine import lease, sessions, status, statedir
from sifoverlay.engine.leasefile import replace_record
from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.jobend import finish_job

from tests.conftest import require_root, require_tool
from tests.slurm.test_epilog_metrics import _write_with_debugfs, config, overlay_image  # noqa: F401

SWEEP_AS_N1 = """
import json, socket, sys
from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.sweeper import sweep
assert socket.gethostname() == "n1", socket.gethostname()
fields = json.loads(sys.argv[1])
fields["image_roots"] = tuple(fields["image_roots"])
class Over:  # slurmctld: the job is over, its node DOWN
    name = "fixed"
    def is_alive(self, job):
        return job != sys.argv[2]
print(json.dumps(sweep(SlurmConfig(**fields), Over(), node_down=lambda node: True).as_dict()))
"""


@pytest.fixture
def cfg(config: SlurmConfig) -> SlurmConfig:  # noqa: F811
    require_root()  # the sweeping "node" gets its own host name (unshare --uts)
    require_tool("unshare")
    return dataclasses.replace(config, lease_ttl=6.0, lease_grace=4.0)


def sweep_as_n1(cfg: SlurmConfig, job: str) -> dict[str, Any]:
    """One cluster sweep by another node: a process whose host name is n1."""
    done = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname n1 && exec "$@"', "sh", sys.executable, "-c",
                           SWEEP_AS_N1, json.dumps(dataclasses.asdict(cfg)), job],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def thawed_job(cfg: SlurmConfig, image: Path, job: str) -> str:
    """What this node's Prolog and keeper left when the node froze 60 s ago: the job's
    lease, renewed last by a keeper that is gone, expired past ttl + grace; its session."""
    held = lease.acquire(image, lease.Holder.current(job, "slurm"), ttl=cfg.lease_ttl, grace=cfg.lease_grace,
                         state_dir=cfg.state_dir)
    held.unlock_range()  # the FUSE daemon that held the byte-range lock was fenced
    gone = subprocess.Popen(["true"])
    gone.wait()
    beat = time.time() - 60
    replace_record(held.file_path, dict(held.info.record, keeper=True, pid=gone.pid, started=1, heartbeat=beat,
                                        expires=beat + cfg.lease_ttl))
    st = os.stat(image)
    sessions.start(cfg.journal_dir, job, image, mode="rw", host=socket.gethostname(), uid=os.getuid(),
                   source="slurm", per_host=True,
                   details={"dev": st.st_dev, "ino": st.st_ino, "gid": os.getgid(), "token": held.token,
                            "key": statedir.key_of_path(str(image)), "state_dir": cfg.state_dir})
    return held.token


def revisions_of(image: Path, job: str) -> list[dict[str, Any]]:
    from sifoverlay.engine.history import read_log

    return [r for r in read_log(str(image)).newest_first()
            if isinstance(r.get("who"), dict) and str(r["who"].get("job_id")) == job]


def outcomes_of(report: dict[str, Any], job: str) -> list[tuple[str, str]]:
    return [(o["result"], o["detail"]) for o in report["outcomes"] if o["job_id"] == job]


def hold_at(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, first: Callable[[], None]) -> None:
    """Run `first()` when this process first calls module.name, then the real one."""
    real = getattr(module, name)
    pending = [first]

    def held(*args: Any, **kwargs: Any) -> Any:
        while pending:
            pending.pop()()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)


def test_the_ender_wins_its_expired_lease_before_reconciling(overlay_image: Path, cfg: SlurmConfig,  # noqa: F811
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job end reaches its commit; a sweep of n1 comes right then. The job end broke
    its expired lease first (and reconciles under a lease of its own), so the sweep finds
    the image held by that job end and leaves it alone: one reconcile, one revision."""
    from sifoverlay.engine import commit

    thawed_job(cfg, overlay_image, "9901")
    _write_with_debugfs(overlay_image, tmp_path)  # the job's write before the freeze
    reports: list[dict[str, Any]] = []
    hold_at(monkeypatch, commit, "commit", lambda: reports.append(sweep_as_n1(cfg, "9901")))
    done = finish_job("9901", cfg, reason="epilog")
    assert done.result == "reconciled", done
    assert len(reports) == 1 and outcomes_of(reports[0], "9901") == [], reports
    [why] = [s["why"] for s in reports[0]["skipped"] if s["job_id"] == "9901"]
    assert why.startswith(f"host {socket.gethostname()} still heartbeats its lease"), why  # the job end's new lease
    assert reports[0]["stale_broken"] == []
    revisions = revisions_of(overlay_image, "9901")
    assert [r["who"]["node"] for r in revisions] == [os.uname().nodename], revisions
    assert status(overlay_image).state == "clean"
    assert lease.inspect(overlay_image, state_dir=cfg.state_dir) is None
    assert sessions.open_sessions(cfg.journal_dir) == []


def test_the_ender_that_loses_the_break_touches_nothing(overlay_image: Path, cfg: SlurmConfig,  # noqa: F811
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """n1's sweep breaks the expired lease and reconciles while the job end is about to
    break it: the job end loses the break, ends as `fenced` and writes nothing."""
    from sifoverlay.engine import leasestale

    thawed_job(cfg, overlay_image, "9902")
    _write_with_debugfs(overlay_image, tmp_path)
    reports: list[dict[str, Any]] = []
    after_sweep: list[bytes] = []

    def sweep_first() -> None:
        reports.append(sweep_as_n1(cfg, "9902"))
        after_sweep.append(overlay_image.read_bytes())

    hold_at(monkeypatch, leasestale, "break_file", sweep_first)
    done = finish_job("9902", cfg, reason="epilog")
    assert len(reports) == 1, "the job end never tried to break its expired lease"
    assert [r for r, _ in outcomes_of(reports[0], "9902")] == ["reconciled"], reports
    assert (done.result, done.step) == ("fenced", "claim"), done
    assert "lost the break of its expired lease" in done.detail, done
    assert overlay_image.read_bytes() == after_sweep[0]
    revisions = revisions_of(overlay_image, "9902")
    assert [r["who"]["node"] for r in revisions] == ["n1"], revisions
    assert status(overlay_image).state == "clean"
    assert lease.inspect(overlay_image, state_dir=cfg.state_dir) is None
    assert sessions.open_sessions(cfg.journal_dir) == []
