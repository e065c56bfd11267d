"""The lease keeper with the real Prolog and Epilog (issue 13), without slurmd: the hooks
run as processes (`python -m sifoverlay.slurm.prolog` / `.epilog`, as the wrappers run
them) as root with the environment slurmd gives them and a plugstack of their own, on a
real image with real FUSE mounts as the job's user, a short lease (ttl 3 s, grace 2 s).

* the Prolog starts a keeper that becomes the lease's holder and renews it past the ttl;
  the Epilog stops it, reconciles, releases: nothing left;
* when the lease is taken over (another node broke and retook it), the keeper fences at
  once: the job's FUSE daemons are SIGKILLed (no unmount, no flush), and the job's end
  closes the session as "fenced" without touching the image or the new holder's lease.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sifoverlay.engine import lease, procs, sessions
from sifoverlay.engine.leasefile import read_info, replace_record
from sifoverlay.slurm.config import SlurmConfig, load_config

from tests.conftest import require_root, require_tool
from tests.slurm.conftest import User, _base_for, sh

JOB = "91001"


@dataclass
class Site:
    image: Path
    config: SlurmConfig
    env: dict[str, str]
    stopped: list[int] | None = None  # pids a test SIGSTOPped (continued by the fixture, whatever happens)

    def lease_file(self) -> str:
        return lease.lease_path(self.image, state_dir=self.config.state_dir)

    def record(self) -> lease.LeaseInfo | None:
        return read_info(self.lease_file())

    def fuse_pids(self) -> list[tuple[int, int | None]]:
        state = json.loads((Path(self.config.mounts_dir) / JOB / "state.json").read_text())
        return [(s["pid"], s["pid_start"]) for s in state["steps"] if s["kind"] == "fuse" and s["pid"]]


@pytest.fixture
def site(slurm_users: tuple[User, User], imported_image: Path, tmp_path: Path) -> Iterator[Site]:
    require_root()
    require_tool("fuse2fs", "squashfuse", "fuse-overlayfs")
    alice = slurm_users[0]
    shared = Path("/var/tmp") / f"sifoverlay-keeper-{uuid.uuid4().hex[:8]}"  # the job user must reach it
    shared.mkdir(mode=0o755)
    image = shared / "img.oci.sif"
    sh("cp", "--sparse=always", str(_base_for(alice, imported_image, {})), str(image))
    os.chown(image, alice.uid, alice.gid)
    run = Path("/run") / f"sifoverlay-keeper-{uuid.uuid4().hex[:8]}"
    run.mkdir(mode=0o755)
    state = tmp_path / "state"
    plugstack = tmp_path / "plugstack.conf"
    plugstack.write_text(f"required /usr/lib/sifoverlay/sifoverlay_spank.so runtime_dir={run} state_dir={state} "
                         "lease_ttl=3 lease_grace=2\n")
    config = load_config(str(plugstack))
    assert config.journal_dir == str(state / "journal")  # beside the leases
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_JOB_ID": JOB, "SLURM_JOB_UID": str(alice.uid),
           "SLURM_JOB_GID": str(alice.gid), "SLURM_JOB_USER": alice.name,
           "SPANK_OCI_SIF_OVERLAY": f"{image}:rw", "SIFOVERLAY_PLUGSTACK": str(plugstack),
           "SIFOVERLAY_SLURM_LOG": str(tmp_path / "slurm.log")}
    made = Site(image, config, env)
    try:
        yield made
    finally:
        for pid in made.stopped or ():
            try:
                os.kill(pid, 18)  # SIGCONT: a stopped FUSE daemon would hang the unmount below
            except ProcessLookupError:
                pass
        info = made.record()
        if info is not None and info.record.get("keeper") and procs.process_alive(info.pid, info.started):
            os.kill(info.pid, 9)
        from sifoverlay import runtime

        runtime.teardown(JOB, base_dir=config.mounts_dir)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def hook(site: Site, name: str) -> str:
    """Run the Prolog or Epilog as slurmd would (a process of its own, exit status 0); its log."""
    done = subprocess.run([sys.executable, "-m", f"sifoverlay.slurm.{name}"], env=site.env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    if name == "prolog":  # prolog_mounts=detached: its mounter may still mount; the plugin waits alike
        _wait_for_record(site)
    return done.stderr


def _wait_for_record(site: Site) -> None:
    from sifoverlay.slurm import records

    deadline = time.monotonic() + 60
    while (record := records.read(site.config.records_dir, JOB)) is None or record.status == "preparing":
        assert time.monotonic() < deadline, f"job {JOB}: still {record} after 60 s"
        time.sleep(0.01)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prolog_keeper_renews_and_epilog_stops_and_releases(site: Site) -> None:
    hook(site, "prolog")
    info = site.record()
    assert info is not None and info.job_id == JOB and info.record["keeper"] is True
    keeper_pid, keeper_start = info.pid, info.started
    assert keeper_pid != os.getpid() and procs.process_alive(keeper_pid, keeper_start)
    assert info.record["ttl"] == 3.0 and info.record["grace"] == 2.0
    first = info.expires
    time.sleep(site.config.lease_ttl + 1.5)  # past the ttl: alive only because it is renewed
    renewed = site.record()
    assert renewed is not None and renewed.expires > first + 1 and renewed.token == info.token
    assert renewed.is_alive(grace=0)
    assert all(procs.process_alive(pid, start) for pid, start in site.fuse_pids())
    log = hook(site, "epilog")
    if "(epilog): pending at step handoff" in log:  # epilog_reconcile=async: the worker ends the job
        from sifoverlay.slurm.endlock import in_progress

        deadline = time.monotonic() + 60
        while in_progress(site.config.journal_dir, JOB) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not in_progress(site.config.journal_dir, JOB), "the reconcile worker did not finish in 60 s"
    else:
        assert "(epilog): noop at step record" in log or "(epilog): reconciled at step record" in log, log
    assert not procs.process_alive(keeper_pid, keeper_start)
    assert site.record() is None
    assert sessions.open_sessions(site.config.journal_dir) == []
    assert not (Path(site.config.mounts_dir) / JOB).exists()


def test_keeper_fences_the_job_when_its_lease_is_taken_over(site: Site) -> None:
    hook(site, "prolog")
    info = site.record()
    assert info is not None
    daemons = site.fuse_pids()
    assert len(daemons) >= 2 and all(procs.process_alive(p, s) for p, s in daemons)
    # another node broke the stale lease and took the image (its record, its token)
    replace_record(site.lease_file(), dict(info.record, token="n9-token", host="n9", job_id="777",
                                           heartbeat=time.time(), expires=time.time() + 600))
    start = time.monotonic()
    while any(procs.process_alive(p, s) for p, s in daemons) and time.monotonic() - start < 10:
        time.sleep(0.05)
    fenced_after = time.monotonic() - start
    assert not any(procs.process_alive(p, s) for p, s in daemons), "FUSE daemons still alive"
    assert fenced_after < site.config.lease_ttl / 3 + 2  # within one renewal interval (+ start-up slack)
    deadline = time.monotonic() + 10  # then it scans /proc for other writers of the image and exits
    while procs.process_alive(info.pid, info.started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs.process_alive(info.pid, info.started)  # the keeper exited (fenced)
    before = _sha(site.image)
    log = hook(site, "epilog")
    assert "(epilog): fenced at step record" in log, log
    assert _sha(site.image) == before  # the job's end did not touch the image
    after = site.record()
    assert after is not None and (after.token, after.job_id) == ("n9-token", "777")
    assert sessions.open_sessions(site.config.journal_dir) == []
    print(f"\nkeeper fenced the FUSE daemons {fenced_after:.2f}s after the takeover (interval "
          f"{site.config.lease_ttl / 3:.1f}s)")


def test_node_freeze_past_expiry_fences_on_thaw(site: Site) -> None:
    """The node's processes (keeper and FUSE daemons) SIGSTOPped together past ttl + grace,
    then SIGCONTed together in pid order (as `dev-cluster node thaw` does): the keeper's
    first act is the judgement, and it kills the daemons before any renewal."""
    import signal

    hook(site, "prolog")
    info = site.record()
    assert info is not None
    daemons = site.fuse_pids()
    node = sorted([info.pid, *(p for p, _ in daemons)])
    site.stopped = node
    for pid in node:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(site.config.lease_ttl + site.config.lease_grace + 1)
    before = site.record()
    for pid in node:
        os.kill(pid, signal.SIGCONT)
    assert before is not None and before.token == info.token and time.time() > before.expires + 2.0
    start = time.monotonic()
    while any(procs.process_alive(p, s) for p, s in daemons) and time.monotonic() - start < 10:
        time.sleep(0.01)
    took = time.monotonic() - start
    assert not any(procs.process_alive(p, s) for p, s in daemons), "FUSE daemons survived the thaw"
    after = site.record()
    assert after is not None and after.heartbeat == before.heartbeat  # no renewal after the loss
    log = hook(site, "epilog")
    assert "(epilog): fenced at step record" not in log  # nobody took it: its own job end may still reconcile
    print(f"\nfreeze past ttl+grace: FUSE daemons killed {took:.3f}s after SIGCONT")
