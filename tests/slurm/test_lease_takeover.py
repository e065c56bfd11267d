"""The cluster sweeper and the job end across nodes (issue 13), without a Slurm cluster:
real images and writes, sessions and leases of "other nodes" in a shared state directory
(other host name and boot_id, a pid that is a live process of this machine, as on the
multi-node test bed's shared pid space), slurmctld's answers from fixed tables.

The rule under test: another host's job is taken over only when Slurm says the job is
over or its node DOWN, AND that host's lease is stale by its heartbeat; a fenced job's
own job end never reconciles an image it lost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sifoverlay.engine import lease, sessions, status
from sifoverlay.engine.leasefile import read_info, replace_record
from sifoverlay.slurm.config import SlurmConfig, parse_args
from sifoverlay.slurm.jobend import finish_job
from sifoverlay.slurm.sweeper import sweep

from tests.slurm.test_epilog_metrics import FixedJobState, _write_with_debugfs, config, overlay_image  # noqa: F401

DEAD = "n-dead"


def _node_down(table: dict[str, bool]):  # type: ignore[no-untyped-def]
    return lambda node: table.get(node)


def _session_of_dead_node(config: SlurmConfig, image: Path, job: str, *, heartbeat_ago: float, ttl: float = 6,
                          grace: float = 4, mode: str = "rw") -> str:
    """What node n-dead's Prolog left: its lease (token recorded in its session) and its
    per-host session; the lease last renewed `heartbeat_ago` seconds ago."""
    from sifoverlay.engine import statedir

    take = lease.acquire if mode == "rw" else lease.acquire_shared
    held = take(image, lease.Holder.current(job, "slurm"), ttl=ttl, grace=grace, state_dir=config.state_dir)
    held.unlock_range()
    now = time.time()
    replace_record(held.file_path, dict(held.info.record, host=DEAD, boot_id="dead-boot", keeper=True,
                                        heartbeat=now - heartbeat_ago, expires=now - heartbeat_ago + ttl))
    st = os.stat(image)
    sessions.start(config.journal_dir, job, image, mode=mode, host=DEAD, uid=os.getuid(), source="slurm",
                   per_host=True, details={"dev": st.st_dev, "ino": st.st_ino, "gid": os.getgid(),
                                           "token": held.token, "key": statedir.key_of_path(str(image)),
                                           "state_dir": config.state_dir})
    return held.token


@pytest.fixture
def cfg(config: SlurmConfig) -> SlurmConfig:  # noqa: F811
    from dataclasses import replace

    return replace(config, lease_ttl=6.0, lease_grace=4.0)


def test_dead_node_is_taken_over_when_slurm_and_heartbeat_agree(overlay_image: Path, cfg: SlurmConfig,  # noqa: F811
                                                                tmp_path: Path) -> None:
    _session_of_dead_node(cfg, overlay_image, "501", heartbeat_ago=60)
    _write_with_debugfs(overlay_image, tmp_path)  # n-dead's job wrote before dying
    assert status(overlay_image).state != "clean"
    report = sweep(cfg, FixedJobState(frozenset({"501"})), node_down=_node_down({DEAD: True}))
    [done] = report.outcomes
    assert (done.job_id, done.result) == ("501", "reconciled"), done
    assert f"taken over from host {DEAD}" in done.detail
    assert report.stale_broken == [str(overlay_image)]
    assert status(overlay_image).state == "clean"  # the dead node's write is kept and committed
    assert sessions.open_sessions(cfg.journal_dir) == []
    assert lease.inspect(overlay_image, state_dir=cfg.state_dir) is None


def test_node_down_is_enough_from_slurm_while_the_job_is_still_listed(overlay_image: Path,  # noqa: F811
                                                                       cfg: SlurmConfig) -> None:
    _session_of_dead_node(cfg, overlay_image, "502", heartbeat_ago=60)
    report = sweep(cfg, FixedJobState(frozenset()), node_down=_node_down({DEAD: True}))
    assert [(o.job_id, o.result) for o in report.outcomes] == [("502", "noop")]


@pytest.mark.parametrize("heartbeat_ago,over,down,why", [
    (1, True, True, "still heartbeats its lease"),  # cut off from slurmctld, alive: Slurm alone never decides
    (8, True, True, "still heartbeats its lease"),  # expired, but within the grace (6 + 4 s)
    (60, False, False, "Slurm says job and node live"),  # stale heartbeat alone does not decide either
])
def test_no_takeover_unless_both_agree(overlay_image: Path, cfg: SlurmConfig, tmp_path: Path,  # noqa: F811
                                       heartbeat_ago: float, over: bool, down: bool, why: str) -> None:
    token = _session_of_dead_node(cfg, overlay_image, "503", heartbeat_ago=heartbeat_ago)
    _write_with_debugfs(overlay_image, tmp_path)
    before = overlay_image.read_bytes()
    report = sweep(cfg, FixedJobState(frozenset({"503"}) if over else frozenset()),
                   node_down=_node_down({DEAD: down}))
    assert report.outcomes == [] and len(report.skipped) == 1
    assert report.skipped[0][0] == "503" and why in report.skipped[0][1], report.skipped
    assert overlay_image.read_bytes() == before
    info = lease.inspect(overlay_image, state_dir=cfg.state_dir)
    assert info is not None and info.token == token
    assert [s.host for s in sessions.open_sessions(cfg.journal_dir)] == [DEAD]


def test_superseded_session_is_closed_without_touching_the_image(overlay_image: Path,  # noqa: F811
                                                                  cfg: SlurmConfig) -> None:
    """Another job (on a third node) already broke n-dead's stale lease and holds the image."""
    _session_of_dead_node(cfg, overlay_image, "504", heartbeat_ago=60)
    assert lease.break_stale(overlay_image, grace=4, state_dir=cfg.state_dir) is True
    other = lease.acquire(overlay_image, lease.Holder.current("600", "slurm"), ttl=60, state_dir=cfg.state_dir)
    try:
        before = overlay_image.read_bytes()
        report = sweep(cfg, FixedJobState(frozenset({"504"})), node_down=_node_down({DEAD: True}))
        assert [(o.job_id, o.result) for o in report.outcomes] == [("504", "fenced")]
        assert overlay_image.read_bytes() == before
        info = lease.inspect(overlay_image, state_dir=cfg.state_dir)
        assert info is not None and info.job_id == "600"
    finally:
        other.release()


def test_fenced_jobs_own_end_does_not_reconcile(overlay_image: Path, cfg: SlurmConfig,  # noqa: F811
                                                tmp_path: Path) -> None:
    """This node's job lost its lease (frozen past expiry + grace; job 700 of another node
    took the image): its Epilog closes the session as "fenced" and leaves image and lease."""
    import socket

    from sifoverlay.engine import statedir

    held = lease.acquire(overlay_image, lease.Holder.current("505", "slurm"), ttl=6, grace=4,
                         state_dir=cfg.state_dir)
    held.unlock_range()
    st = os.stat(overlay_image)
    sessions.start(cfg.journal_dir, "505", overlay_image, mode="rw", host=socket.gethostname(), uid=os.getuid(),
                   source="slurm", per_host=True, details={"dev": st.st_dev, "ino": st.st_ino, "token": held.token,
                                                           "key": statedir.key_of_path(str(overlay_image))})
    replace_record(held.file_path, dict(held.info.record, token="t-700", job_id="700", host="n3"))
    _write_with_debugfs(overlay_image, tmp_path)  # job 700's write
    before = overlay_image.read_bytes()
    done = finish_job("505", cfg, reason="epilog")
    assert (done.result, done.step) == ("fenced", "record"), done
    assert overlay_image.read_bytes() == before
    info = read_info(held.file_path)
    assert info is not None and (info.job_id, info.token) == ("700", "t-700")
    assert sessions.open_sessions(cfg.journal_dir) == []


def test_reader_of_a_dead_node_is_released_by_the_cluster_sweep(overlay_image: Path,  # noqa: F811
                                                                 cfg: SlurmConfig) -> None:
    _session_of_dead_node(cfg, overlay_image, "506", heartbeat_ago=60, mode="ro")
    report = sweep(cfg, FixedJobState(frozenset({"506"})), node_down=_node_down({}))
    assert [(o.job_id, o.result) for o in report.outcomes] == [("506", "released")]
    assert lease.readers(overlay_image, state_dir=cfg.state_dir) == []


def test_multinode_ro_job_has_one_session_per_node(overlay_image: Path, cfg: SlurmConfig) -> None:  # noqa: F811
    for host in ("n1", "n2", "n3"):
        sessions.start(cfg.journal_dir, "507", overlay_image, mode="ro", host=host, uid=0, source="slurm",
                       per_host=True)
    assert sorted(s.host for s in sessions.open_sessions(cfg.journal_dir)) == ["n1", "n2", "n3"]
    assert sessions.finish(cfg.journal_dir, "507", "done", host="n2") is not None
    assert sessions.load(cfg.journal_dir, "507", host="n2") is None
    assert sessions.load(cfg.journal_dir, "507", host="n3") is not None


# -- configuration -------------------------------------------------------------------------
def test_journal_beside_the_leases_and_lease_keys() -> None:
    shared = parse_args(["state_dir=/shared/sifoverlay", "lease_ttl=90", "lease_grace=30"])
    assert (shared.journal_dir, shared.lease_ttl, shared.lease_grace) == ("/shared/sifoverlay/journal", 90.0, 30.0)
    explicit = parse_args(["state_dir=/shared/s", "journal_dir=/var/lib/j"])
    assert explicit.journal_dir == "/var/lib/j"
    assert (SlurmConfig().lease_ttl, SlurmConfig().lease_grace) == (180.0, 120.0)
    from sifoverlay.errors import UsageError

    with pytest.raises(UsageError, match="plugstack: lease_ttl=0: must be positive"):
        parse_args(["lease_ttl=0"])
    with pytest.raises(UsageError, match="lease_ttl=1: must be at least 2 seconds"):
        parse_args(["lease_ttl=1"])
    with pytest.raises(UsageError, match="lease_grace=5s: expected a positive number"):
        parse_args(["lease_grace=5s"])


def test_frozen_holder_still_holding_the_write_lock_is_not_taken_over(overlay_image: Path, cfg: SlurmConfig,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    """n-dead's lease is stale and Slurm has its node DOWN, but its FUSE daemon still holds
    the ext3's write lock (a frozen node: on the test bed's shared kernel, or a cluster
    filesystem that has not evicted the hung client): one line, nothing broken or written,
    and no wait on the lock. Once the lock goes (the keeper fenced on wake-up), the next
    sweep takes over and reconciles once."""
    import fcntl

    from sifoverlay.engine import leaselock

    token = _session_of_dead_node(cfg, overlay_image, "508", heartbeat_ago=60)
    _write_with_debugfs(overlay_image, tmp_path)
    fd = os.open(overlay_image, os.O_RDWR | os.O_CLOEXEC)  # the frozen daemon's open file and lock
    region = leaselock.overlay_region(str(overlay_image), fd)
    assert leaselock.lock_region(str(overlay_image), fd, region, exclusive=True) is True
    before = overlay_image.read_bytes()
    try:
        started = time.monotonic()
        report = sweep(cfg, FixedJobState(frozenset({"508"})), node_down=_node_down({DEAD: True}))
        assert report.outcomes == [] and report.stale_broken == []
        [(job, why)] = report.skipped
        assert job == "508" and why.startswith(f"image {overlay_image} held by a frozen or unreachable holder: "
                                               f"host {DEAD}'s lease is stale (heartbeat 6"), why
        assert f"but write lock on the overlay held by job 508 (slurm) on host {DEAD} pid " in why, why
        assert why.endswith("; not taken over"), why
        assert time.monotonic() - started < 30  # never a blocking lock wait
        assert overlay_image.read_bytes() == before
        info = lease.inspect(overlay_image, state_dir=cfg.state_dir)
        assert info is not None and info.token == token
        assert [s.host for s in sessions.open_sessions(cfg.journal_dir)] == [DEAD]
        assert leaselock.probe(os.open(overlay_image, os.O_RDONLY | os.O_CLOEXEC), *region,
                               ltype=fcntl.F_RDLCK) is not None
    finally:
        os.close(fd)  # the keeper's fence: the daemon dies, its lock goes
    report = sweep(cfg, FixedJobState(frozenset({"508"})), node_down=_node_down({DEAD: True}))
    assert [(o.job_id, o.result) for o in report.outcomes] == [("508", "reconciled")]
    assert status(overlay_image).state == "clean"
    assert sessions.open_sessions(cfg.journal_dir) == []
    report = sweep(cfg, FixedJobState(frozenset({"508"})), node_down=_node_down({DEAD: True}))
    assert report.outcomes == [] and report.skipped == []
