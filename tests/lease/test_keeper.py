"""Leases that survive nodes (issue 13): the stale rule with heartbeat, expiry, grace,
host and boot_id; `resume` only on the node and boot that took the lease; the keeper's
"lost lease" judgement; and the Slurm keeper process renewing, stopping and fencing.

"Another node" is simulated the way the multi-node test bed shows it: a record with
another host name or boot_id whose pid is a LIVE process of this machine (the test bed's
nodes share one pid space, so a pid alone must never make a holder look alive).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sifoverlay.engine import lease, leasekeeper
from sifoverlay.engine.leasefile import read_info, replace_record

from .conftest import REGION


def _holder(job: str = "100") -> lease.Holder:
    return lease.Holder.current(job, "slurm")


def _rewrite(path: str, **fields: object) -> None:
    info = read_info(path)
    assert info is not None
    replace_record(path, dict(info.record, **fields))


# -- stale rule ------------------------------------------------------------------------------
def test_other_host_with_a_live_pid_is_judged_by_heartbeat_and_grace_only(image: Path) -> None:
    held = lease.acquire(image, _holder(), ttl=30, region=REGION, grace=0)
    now = time.time()
    # "n2", pid = this very (live) process: on a shared pid space the pid proves nothing.
    _rewrite(held.file_path, host="n2-elsewhere", heartbeat=now - 100, expires=now - 50, grace=20.0)
    info = read_info(held.file_path)
    assert info is not None and info.pid == os.getpid()
    assert info.is_alive(grace=0, now=now) is False  # 50 s past expiry > record grace 20
    assert info.is_alive(grace=0, now=now - 40) is True  # 10 s past expiry < the record's grace
    assert info.is_alive(grace=60, now=now) is True  # the breaker's own larger grace counts too


def test_same_host_other_boot_is_gone_at_expiry(image: Path) -> None:
    held = lease.acquire(image, _holder(), ttl=30, region=REGION)
    now = time.time()
    _rewrite(held.file_path, boot_id="00000000-dead-boot-0000-000000000000", expires=now - 1, grace=600.0)
    info = read_info(held.file_path)
    assert info is not None and info.is_alive(now=now) is False  # rebooted: no grace needed
    _rewrite(held.file_path, boot_id=lease.boot_id())
    info = read_info(held.file_path)
    assert info is not None and info.is_alive(now=now) is True  # same boot, holder pid alive


def test_record_announces_its_grace(image: Path) -> None:
    held = lease.acquire(image, _holder(), ttl=5, grace=42, region=REGION)
    assert held.info.record["grace"] == 42.0


# -- resume: only here -----------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("host", "n2"), ("boot_id", "11111111-2222-3333-4444-555555555555")])
def test_resume_refuses_a_lease_taken_on_another_node_or_boot(image: Path, field: str, value: str) -> None:
    """Issue 13: the second node of a -N2 job must not reuse the first node's lease."""
    held = lease.acquire(image, _holder("77"), ttl=60, region=REGION)
    assert lease.resume(image, "77") is not None  # here and now: the requeue case
    _rewrite(held.file_path, **{field: value})
    assert lease.resume(image, "77") is None
    with pytest.raises(Exception, match="held by job 77"):
        lease.acquire(image, _holder("77"), ttl=60, region=REGION)


# -- the keeper's judgement ------------------------------------------------------------------
def test_judge_cases(image: Path) -> None:
    timing = leasekeeper.KeeperTiming(ttl=9, grace=6)
    assert timing.interval == 3.0 and timing.margin == 3.0
    held = lease.acquire(image, _holder(), ttl=9, grace=6, region=REGION)
    info, token, t0 = held.info, held.token, held.info.heartbeat
    # breakable by others from t0 + 9 + 6; the keeper stops renewing a margin (3 s) before
    assert leasekeeper.judge(info, token, timing, now=t0 + 1, since_renewal=1) is None
    assert leasekeeper.judge(info, token, timing, now=t0 + 11.9, since_renewal=1) is None  # expired, in grace
    assert "past the grace of 6 s" in str(leasekeeper.judge(info, token, timing, now=t0 + 12.1, since_renewal=1))
    assert leasekeeper.judge(info, token, timing, now=t0 + 1, since_renewal=11.9) is None
    assert "monotonic" in str(leasekeeper.judge(info, token, timing, now=t0 + 1, since_renewal=12.1))
    assert "gone" in str(leasekeeper.judge(None, token, timing, now=t0, since_renewal=0))
    assert "taken over" in str(leasekeeper.judge(info, "other-token", timing, now=t0, since_renewal=0))
    with pytest.raises(ValueError):
        leasekeeper.KeeperTiming(ttl=3, grace=1, interval=3)


def test_keep_renews_as_holder_then_ends(image: Path) -> None:
    held = lease.acquire(image, _holder(), ttl=4, grace=2, region=REGION)
    first_expiry = held.info.expires
    stop = threading.Event()
    renewals: list[float] = []
    fenced: list[str] = []

    def ended() -> bool:
        info = read_info(held.file_path)
        if info is not None:
            renewals.append(info.expires)
        return len(renewals) >= 3

    verdict = leasekeeper.keep(held.file_path, held.token, leasekeeper.KeeperTiming(4, 2, 0.05), fence=fenced.append,
                               ended=ended, stop=stop)
    assert verdict == "ended" and fenced == []
    info = read_info(held.file_path)
    assert info is not None and info.expires > first_expiry and info.token == held.token
    assert info.record["keeper"] is True and info.pid == os.getpid() and info.host == socket.gethostname()


def test_keep_fences_when_taken_over(image: Path) -> None:
    held = lease.acquire(image, _holder(), ttl=4, grace=2, region=REGION)
    _rewrite(held.file_path, token="someone-else", host="n3", job_id="200")
    fenced: list[str] = []
    verdict = leasekeeper.keep(held.file_path, held.token, leasekeeper.KeeperTiming(4, 2, 0.05), fence=fenced.append,
                               ended=lambda: False)
    assert verdict == "fenced" and len(fenced) == 1 and "job 200" in fenced[0]
    info = read_info(held.file_path)
    assert info is not None and info.token == "someone-else"  # the new holder's record untouched


def test_keep_fences_after_a_monotonic_gap_even_if_the_record_looks_fine(image: Path) -> None:
    """A frozen keeper: CLOCK_MONOTONIC jumped past ttl + grace, wall clock not trusted."""
    held = lease.acquire(image, _holder(), ttl=4, grace=2, region=REGION)
    import itertools

    # start, first check, first renewal at 0; then the keeper "wakes" 100 s later
    ticks = itertools.chain([0.0, 0.0, 0.0], itertools.repeat(100.0))
    fenced: list[str] = []
    verdict = leasekeeper.keep(held.file_path, held.token, leasekeeper.KeeperTiming(4, 2, 0.01),
                               fence=fenced.append, ended=lambda: False, clock=lambda: next(ticks))
    assert verdict == "fenced" and "monotonic" in fenced[0]


def test_keep_ends_quietly_when_released_and_session_closed(image: Path) -> None:
    held = lease.acquire(image, _holder(), ttl=4, grace=2, region=REGION)
    held.release()
    fenced: list[str] = []
    calls = iter([False, True])
    verdict = leasekeeper.keep(held.file_path, held.token, leasekeeper.KeeperTiming(4, 2, 0.05),
                               fence=fenced.append, ended=lambda: next(calls))
    assert verdict == "ended" and fenced == []


# -- the Slurm keeper process ----------------------------------------------------------------
class KeeperSite:
    """A lease, a session and a runtime record with one fake FUSE daemon, as a Prolog leaves them."""

    def __init__(self, tmp: Path, image: Path, state: Path, *, ttl: float, grace: float) -> None:
        from sifoverlay.engine import sessions, statedir

        self.image, self.state, self.ttl, self.grace = image, state, ttl, grace
        self.journal = tmp / "journal"
        self.mounts = tmp / "mounts"
        self.job = "4242"
        self.held = lease.acquire(image, lease.Holder.current(self.job, "slurm"), ttl=ttl, grace=grace, region=REGION)
        self.held.unlock_range()  # the Prolog hands the lock to the FUSE daemon
        st = os.stat(image)
        self.key = statedir.key_of_path(str(image))
        sessions.start(self.journal, self.job, image, mode="rw", host=socket.gethostname(), uid=os.getuid(),
                       source="slurm", per_host=True, details={"token": self.held.token, "key": self.key})
        # the "FUSE daemon": holds the image open for writing, recorded in the runtime state
        self.daemon = subprocess.Popen([sys.executable, "-c", "import os,sys,time\nfd=os.open(sys.argv[1], os.O_RDWR)\n"
                                        "print('ready', flush=True)\ntime.sleep(600)", str(image)],
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.daemon.stdout is not None and self.daemon.stdout.readline().strip() == "ready"
        job_dir = self.mounts / self.job
        job_dir.mkdir(parents=True)
        from sifoverlay.engine.procs import process_start_ticks

        (job_dir / "state.json").write_text(json.dumps({
            "version": 1, "job_id": self.job, "image": str(image), "image_dev": st.st_dev, "image_ino": st.st_ino,
            "mode": "fuse", "writable": True, "uid": os.getuid(), "gid": os.getgid(), "created": time.time(),
            "steps": [{"kind": "fuse", "name": "ext3", "target": str(job_dir / "ext3"), "status": "mounted",
                       "pid": self.daemon.pid, "pid_start": process_start_ticks(self.daemon.pid), "loop": None}]}))
        from sifoverlay.slurm import keeper

        self.proc = keeper.start(job_id=self.job, key=self.key, token=self.held.token, image=str(image),
                                dev=st.st_dev, ino=st.st_ino, state_dir=str(state), journal_dir=str(self.journal),
                                mounts_dir=str(self.mounts), ttl=ttl, grace=grace, host=socket.gethostname())
        self.pid = self.proc.pid

    def record(self) -> lease.LeaseInfo:
        info = read_info(self.held.file_path)
        assert info is not None
        return info

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        for pid in (self.pid, self.daemon.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.daemon.wait()
        self.proc.wait()


@pytest.fixture
def site(tmp_path: Path, image: Path, state_dir: Path) -> KeeperSite:
    made = KeeperSite(tmp_path, image, state_dir, ttl=3, grace=2)
    yield made  # type: ignore[misc]
    made.cleanup()


def test_keeper_process_heartbeats_as_holder_and_stops_without_releasing(site: KeeperSite) -> None:
    from sifoverlay.slurm import keeper

    info = site.record()
    assert info.pid == site.pid and info.record["keeper"] is True
    first = info.expires
    time.sleep(site.ttl / 3 + 0.8)
    assert site.record().expires > first  # renewed
    assert keeper.stop(site.record()) is True
    assert site.wait_exit(5) == 0
    assert site.record().token == site.held.token  # still there: the job end releases
    assert site.daemon.poll() is None  # a stopped keeper fences nothing


def test_keeper_exits_when_the_session_closes(site: KeeperSite) -> None:
    from sifoverlay.engine import sessions

    sessions.finish(site.journal, site.job, "done", host=socket.gethostname())
    assert site.wait_exit(site.ttl) == 0
    assert site.daemon.poll() is None


def test_frozen_keeper_fences_at_once_after_its_lease_was_taken_over(site: KeeperSite) -> None:
    """SIGSTOP past expiry + grace; meanwhile another node breaks and retakes the lease;
    SIGCONT: the keeper renews nothing and SIGKILLs the job's writer of the image."""
    os.kill(site.pid, signal.SIGSTOP)
    time.sleep(site.ttl + site.grace + 0.5)
    _rewrite(site.held.file_path, token="n3-token", host="n3", job_id="5000", heartbeat=time.time(),
             expires=time.time() + 60)
    os.kill(site.pid, signal.SIGCONT)
    assert site.wait_exit(5) == 3
    assert site.daemon.wait(5) == -signal.SIGKILL
    after = site.record()
    assert (after.token, after.host, after.job_id) == ("n3-token", "n3", "5000")


def test_frozen_keeper_fences_past_grace_even_if_nobody_took_over(site: KeeperSite) -> None:
    os.kill(site.pid, signal.SIGSTOP)
    time.sleep(site.ttl + site.grace + 0.5)
    before = site.record()
    os.kill(site.pid, signal.SIGCONT)
    assert site.wait_exit(5) == 3
    assert site.daemon.wait(5) == -signal.SIGKILL
    assert site.record().heartbeat == before.heartbeat  # no renewal after the loss
    from sifoverlay.engine import sessions

    marked = sessions.load(site.journal, site.job, host=socket.gethostname())  # the fence, written down
    assert marked is not None and "past the grace of 2 s" in marked.details["fenced"], marked
    assert marked.details["fenced_at"] > before.expires + site.grace


def test_short_freeze_within_ttl_leaves_no_fence_mark(site: KeeperSite) -> None:
    from sifoverlay.engine import sessions

    os.kill(site.pid, signal.SIGSTOP)
    time.sleep(site.ttl / 2)
    os.kill(site.pid, signal.SIGCONT)
    time.sleep(site.ttl / 3 + 0.5)
    session = sessions.load(site.journal, site.job, host=socket.gethostname())
    assert session is not None and "fenced" not in session.details


def test_short_freeze_within_ttl_is_harmless(site: KeeperSite) -> None:
    os.kill(site.pid, signal.SIGSTOP)
    time.sleep(site.ttl / 2)
    os.kill(site.pid, signal.SIGCONT)
    time.sleep(site.ttl / 3 + 0.5)
    assert site.daemon.poll() is None and site.record().pid == site.pid
    assert site.wait_exit(0.1) is None  # still running


def _holder_of_image(image: Path, *, uid: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """A process with the image open for writing: opened as root, then running as `uid`."""
    code = ("import os,sys,time\nfd=os.open(sys.argv[1], os.O_RDWR)\nuid=int(sys.argv[2])\n"
            "os.setgroups([])\nos.setresgid(uid,uid,uid)\nos.setresuid(uid,uid,uid)\n"
            "print('ready', flush=True)\ntime.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(image), str(uid)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_fence_kills_the_jobs_writers_but_not_hooks_or_other_jobs(site: KeeperSite) -> None:
    """Measured on the 3-node bed (bench/soak.py --nodes 3): a keeper that woke past its
    grace SIGKILLed the next job's Prolog, which held the image open while it waited for
    the lease; slurmd failed that job and drained the node. Only the job's own writers go."""
    from tests.conftest import require_root

    require_root()  # processes of other uids
    nobody = 65534
    writers = {
        "job task": (_holder_of_image(site.image, uid=nobody, env={"SLURM_JOB_ID": site.job}), True),
        "unlabelled user process": (_holder_of_image(site.image, uid=nobody, env={}), True),
        "next job's Prolog (root)": (_holder_of_image(site.image, uid=0, env={"SLURM_JOB_ID": "4243"}), False),
        "root hook, no Slurm environment": (_holder_of_image(site.image, uid=0, env={}), False),
        "Epilog child as the user": (_holder_of_image(site.image, uid=nobody, env={
            "SLURM_JOB_ID": site.job, "SLURM_SCRIPT_CONTEXT": "epilog_slurmd"}), False),
        "another job's task": (_holder_of_image(site.image, uid=nobody, env={"SLURM_JOB_ID": "4243"}), False),
    }
    try:
        os.kill(site.pid, signal.SIGSTOP)
        time.sleep(site.ttl + site.grace + 0.5)
        os.kill(site.pid, signal.SIGCONT)
        assert site.wait_exit(5) == 3
        assert site.daemon.wait(5) == -signal.SIGKILL  # the recorded FUSE daemon
        for what, (proc, killed) in writers.items():
            if killed:
                assert proc.wait(5) == -signal.SIGKILL, what
            else:
                assert proc.poll() is None, f"{what} was killed by the fence"
    finally:
        for proc, _ in writers.values():
            proc.kill()
            proc.wait()
