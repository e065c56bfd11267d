"""Node failures on the 3-node test bed (issue 13): a node killed mid-write, a node killed
after its job end was cut inside the commit, a node cut off mid-job. Real daemons:
`dev-cluster node kill|cut NODE`; the commit is cut by the crash hook (SIFOVERLAY_CRASH_AT)
given to one node's Epilog and reconcile worker through the bed's Epilog knobs file.

Not here (see docs/slurm.md): the engine-level cases of a dead node's interrupted commit
(rolled forward, rolled back, within the grace) in tests/engine/test_recover_dead_node.py; a node frozen
past expiry + grace is in test_failures_freeze.py (on this bed its ext3 FUSE daemon keeps
the image's OFD write lock, the nodes sharing one kernel: no takeover while frozen, fence
on thaw) and, with the takeover a cluster with separate kernels gets, at one node in
tests/slurm/test_keeper_hooks.py.

The bed's plugstack sets a short lease (lease_ttl / lease_grace, a few seconds) so that
takeover happens within a test. Recovery after a node death is driven by the cluster
sweeper run on another node (`python -m sifoverlay.slurm.sweeper` inside n1), the way
the timer would, once a second; the measured times are printed (run with -s) and bounded:
Slurm needs SlurmdTimeout + 15..21 s to set a node DOWN (../shared/spec notes, 4.4), and
the lease needs ttl + grace after its last heartbeat.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sifoverlay.engine import lease, sessions, statedir
from sifoverlay.slurm.config import SlurmConfig, load_config

from tests.cluster.conftest import BED_CONF, Bed
from tests.slurm.conftest import User

PYTHON = "/opt/sifoverlay/bin/python"
SLURMD_TIMEOUT = 10  # the bed's slurm.conf (as in the spec's measurements)
FOREVER = 'i=0; while :; do echo "$SLURM_JOB_ID $i" >> /progress.log; i=$((i+1)); sleep 0.2; done'


def _soak_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[2] / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("soak", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conf(bed: Bed) -> SlurmConfig:
    config = load_config(env={"SLURM_CONF": BED_CONF})
    assert config.lease_ttl + config.lease_grace <= 30, (
        f"the test bed's plugstack needs a short lease (lease_ttl + lease_grace <= 30 s), has "
        f"lease_ttl={config.lease_ttl:g} lease_grace={config.lease_grace:g}")
    assert config.journal_dir.startswith(config.state_dir), (
        f"journal_dir {config.journal_dir} must be beside the leases in the shared state_dir {config.state_dir}")
    return config


# -- helpers ---------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> float:
    """Poll until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def rootfs_file(conf: SlurmConfig, job: int, name: str) -> str:
    return os.path.join(conf.mounts_dir, str(job), "rootfs", name)


def lines_on_node(bed: Bed, node: str, conf: SlurmConfig, job: int, name: str = "progress.log") -> int:
    done = bed.on_node(node, "sh", "-c", f"wc -l < {rootfs_file(conf, job, name)}")
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def overlay_file(image: Path, name: str) -> str:
    """A file of the overlay's upper layer, read straight from the image (debugfs -c: no
    mount, read-only): what the image holds, whatever any node still caches."""
    from sifoverlay.ocisif import open_image

    with open_image(image) as img:
        assert img.overlay is not None
        offset = img.overlay.offset
    done = subprocess.run(["debugfs", "-c", "-R", f"cat /upper/{name}", f"{image}?offset={offset}"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout


def assert_prefix(text: str, job: int) -> int:
    """Lines "JOB 0", "JOB 1", ... consecutive from 0 (no hole, no torn line); their count."""
    lines = text.splitlines()
    assert lines == [f"{job} {i}" for i in range(len(lines))], f"not a clean prefix of job {job}'s lines: {lines[-5:]}"
    return len(lines)


def assert_consistent(image: Path) -> None:
    from sifoverlay.engine import status

    check = _soak_module().check_image(image)
    assert check["ok"], check["problems"]
    assert status(image).state == "clean"


def sweep_on(bed: Bed, node: str) -> dict[str, object]:
    done = bed.on_node(node, PYTHON, "-m", "sifoverlay.slurm.sweeper", "--json", timeout=300)
    try:
        return json.loads(done.stdout)  # type: ignore[no-any-return]
    except ValueError:
        return {"error": done.stderr[-500:], "outcomes": [], "skipped": []}


def session_open(conf: SlurmConfig, job: int, node: str) -> bool:
    return sessions.load(conf.journal_dir, str(job), host=node) is not None


def holder(conf: SlurmConfig, image: Path) -> lease.LeaseInfo | None:
    return lease.inspect(key=statedir.key_of_path(str(image)), state_dir=conf.state_dir)


def revisions_of(image: Path, job: int) -> list[dict[str, object]]:
    from sifoverlay.engine.history import read_log

    return [r for r in read_log(str(image)).newest_first()
            if isinstance(r.get("who"), dict) and str(r["who"].get("job_id")) == str(job)]


def start_writer(bed: Bed, user: User, image: Path, node: str, conf: SlurmConfig, script: str = FOREVER,
                 lines: int = 10) -> int:
    job = bed.sbatch(user, "-w", node, f"--oci-sif-overlay={image}", "-o", "/dev/null", "-D", "/", "--wrap", script)
    bed.wait_state(job, {"RUNNING"}, timeout=120)
    wait_for(lambda: lines_on_node(bed, node, conf, job) >= lines, 60, f"job {job} to write {lines} lines")
    info = holder(conf, image)
    assert info is not None and (info.job_id, info.host) == (str(job), node) and info.record.get("keeper") is True
    return job


# -- node killed ------------------------------------------------------------------------------
def test_node_killed_mid_write_is_recovered_by_another_node(bed: Bed, bed_users: tuple[User, User],
                                                            bed_image: Callable[..., Path], conf: SlurmConfig) -> None:
    alice = bed_users[0]
    image = bed_image(alice)
    job = start_writer(bed, alice, image, "n2", conf)
    seen = lines_on_node(bed, "n2", conf, job)
    last_beat = holder(conf, image).heartbeat  # type: ignore[union-attr]
    killed_wall = time.time()
    assert bed.dev("node", "kill", "n2").returncode == 0
    reports: list[dict[str, object]] = []

    def recovered() -> bool:
        reports.append(sweep_on(bed, "n1"))
        return not session_open(conf, job, "n2")

    took = wait_for(recovered, SLURMD_TIMEOUT + 30 + conf.lease_ttl + conf.lease_grace + 60,
                    "another node to recover the dead node's image", every=1.0)
    down = "down" in bed.node_state("n2")
    outcome = [o for r in reports for o in r.get("outcomes", []) if str(o.get("job_id")) == str(job)]  # type: ignore[union-attr]
    assert [o["result"] for o in outcome] == ["reconciled"], reports[-1]
    assert "taken over from host n2" in str(outcome[0]["detail"])
    kept = assert_prefix(overlay_file(image, "progress.log"), job)
    print(f"\nnode kill: recovered by n1 {took:.1f}s after the kill (lease stale at last heartbeat + "
          f"{conf.lease_ttl + conf.lease_grace:g}s, last heartbeat {killed_wall - last_beat:.1f}s before the kill; "
          f"n2 DOWN at the end: {down}); {kept} lines kept in the image, {seen} seen through the mount before the kill")
    assert kept >= 1
    assert_consistent(image)
    assert holder(conf, image) is None
    assert [r["who"]["node"] for r in revisions_of(image, job)] == ["n1"]  # type: ignore[index]


# -- node killed after its job end was cut inside the commit -----------------------------------
TEN_LINES = 'i=0; while [ $i -lt 10 ]; do echo "$SLURM_JOB_ID $i" >> /progress.log; i=$((i+1)); sleep 0.2; done'


def epilog_knobs(node: str) -> Path:
    """The node's test knobs for its Epilog and reconcile worker (slurm_plugin/dev-cluster-nodes
    EPILOG_KNOBS: the node-local disk, seen here through the host's side of the bind)."""
    return Path("/var/lib/slurm-sifomn/nodes") / node / "local" / "epilog.env"


def commit_cut_at(image: Path, tmp: Path, job: str) -> int:
    """The I/O operation (1-based, as SIFOVERLAY_CRASH_AT counts) at which a reconcile worker
    that syncs `image` inside job `job`'s lease makes its second write into the image: the
    journal's intent is durable and one blob written, the commit half done. Calibrated on a
    copy: the same engine calls with a logging CountingIO (the worker's first counted
    operation is the sync's)."""
    from sifoverlay import engine
    from sifoverlay.engine import statedir as state
    from sifoverlay.fsio import CountingIO

    copy = tmp / "calibrate.oci.sif"
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    offset = _overlay_offset(copy)
    payload = tmp / "payload"
    payload.write_text("calibration\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {payload} upper/calibration", f"{copy}?offset={offset}"],
                   check=True, capture_output=True)
    with state.using(str(tmp / "state")):
        held = lease.acquire(copy, lease.Holder.current(job, "slurm"), ttl=600)
        held.unlock_range()  # the job's byte-range lock went with its FUSE daemon
        io = CountingIO(keep_log=True, name_fds=True)
        engine.sync(copy, job=job, journal_dir=str(tmp / "journal"), io=io)
        held.release()
    writes = [n for n, (op, info) in enumerate(io.log, 1) if op == "pwrite" and info.get("path") == str(copy)]
    assert len(writes) >= 2, io.log
    return writes[1]


def _overlay_offset(image: Path) -> int:
    from sifoverlay.ocisif import open_image

    with open_image(image) as img:
        assert img.overlay is not None
        return img.overlay.offset


def test_node_killed_after_its_commit_was_cut_is_recovered_by_another_node(
        bed: Bed, bed_users: tuple[User, User], bed_image: Callable[..., Path], conf: SlurmConfig,
        tmp_path: Path) -> None:
    """n2's rw job writes 10 lines and ends; its reconcile worker is SIGKILLed half way
    through the commit (the crash hook, set for n2 only), leaving the journal entry in the
    shared journal; then n2 dies. n1's sweeper breaks the stale lease, rolls the entry back
    and reconciles: the job's writes kept, one revision, by n1."""
    from sifoverlay.engine.journal import Journal

    alice = bed_users[0]
    image = bed_image(alice)
    journal = Journal(conf.journal_dir)
    knobs = epilog_knobs("n2")
    assert knobs.parent.is_dir(), f"{knobs.parent}: the bed's node-local disk of n2 is missing"
    cut = commit_cut_at(image, tmp_path, "1")  # before the job: its end must find the knob
    try:
        knobs.write_text(f"SIFOVERLAY_CRASH_AT={cut}\n")
        job = bed.sbatch(alice, "-w", "n2", f"--oci-sif-overlay={image}", "-o", "/dev/null", "-D", "/",
                         "--wrap", TEN_LINES)
        assert bed.wait_finished(job) == "COMPLETED"
        knobs.unlink()
        [entry] = journal.pending(image)  # the worker died inside the commit
        assert entry.intent is not None and entry.intent.op == "sync", entry
        assert session_open(conf, job, "n2") and revisions_of(image, job) == []
        info = holder(conf, image)
        assert info is not None and (info.job_id, info.host) == (str(job), "n2")  # the keeper renews it
        killed = time.monotonic()
        last_beat = time.time() - holder(conf, image).heartbeat  # type: ignore[union-attr]
        assert bed.dev("node", "kill", "n2").returncode == 0
    finally:
        knobs.unlink(missing_ok=True)
    reports: list[dict[str, object]] = []

    def recovered() -> bool:
        reports.append(sweep_on(bed, "n1"))
        return not session_open(conf, job, "n2")

    wait_for(recovered, conf.lease_ttl + conf.lease_grace + 30, "n1 to recover n2's image", every=1.0)
    took = time.monotonic() - killed
    outcome = [o for r in reports for o in r.get("outcomes", []) if str(o.get("job_id")) == str(job)]  # type: ignore[union-attr]
    assert [o["result"] for o in outcome] == ["reconciled"], reports[-1]
    assert "taken over from host n2" in str(outcome[0]["detail"])
    print(f"\nnode kill after a cut commit: recovered by n1 {took:.1f}s after the kill (lease stale at last "
          f"heartbeat + {conf.lease_ttl + conf.lease_grace:g}s, last heartbeat {last_beat:.1f}s before the kill; "
          f"{len(reports)} sweeps); worker cut at I/O op {cut}, journal entry {entry.state.name if entry.state else None}")
    assert journal.pending(image) == []
    assert assert_prefix(overlay_file(image, "progress.log"), job) == 10
    assert_consistent(image)
    assert _soak_module().check_image(image)["overlay_matches"] is True  # recorded digest == the ext3's
    assert holder(conf, image) is None
    revisions = revisions_of(image, job)
    assert [(r["who"]["node"], r["who"]["via"]) for r in revisions] == [("n1", "sweeper")], revisions  # type: ignore[index]


# -- node cut off ----------------------------------------------------------------------------
def test_node_cut_off_mid_job_keeps_its_image_and_ends_once(bed: Bed, bed_users: tuple[User, User],
                                                            bed_image: Callable[..., Path], conf: SlurmConfig) -> None:
    """Only the network is cut: the node's keeper still reaches the shared state directory
    and heartbeats, so no other node touches the image although Slurm declares the node
    DOWN and the job over; after the heal the job's end is done exactly once, by n2."""
    alice = bed_users[0]
    image = bed_image(alice)
    job = start_writer(bed, alice, image, "n2", conf)
    assert bed.dev("node", "cut", "n2").returncode == 0
    cut = time.monotonic()
    beats = []
    skipped = []
    deadline = cut + max(SLURMD_TIMEOUT + 30, conf.lease_ttl + conf.lease_grace + 10)
    while time.monotonic() < deadline:
        report = sweep_on(bed, "n1")
        assert not [o for o in report.get("outcomes", []) if str(o.get("job_id")) == str(job)], report  # type: ignore[union-attr]
        skipped += [s for s in report.get("skipped", []) if str(s.get("job_id")) == str(job)]  # type: ignore[union-attr]
        info = holder(conf, image)
        assert info is not None and (info.job_id, info.host) == (str(job), "n2")
        beats.append(info.heartbeat)
        time.sleep(1.0)
    assert "down" in bed.node_state("n2") or bed.job_state(job) in ("NODE_FAIL", "COMPLETING", "RUNNING")
    assert beats[-1] > beats[0] + conf.lease_ttl  # the keeper kept renewing through the cut
    assert any("still heartbeats" in str(s.get("why")) for s in skipped), skipped  # type: ignore[union-attr]
    assert session_open(conf, job, "n2") and revisions_of(image, job) == []
    healed = time.monotonic()
    assert bed.dev("node", "heal", "n2").returncode == 0
    bed.run("scontrol", "update", "NodeName=n2", "State=RESUME")
    took = wait_for(lambda: not session_open(conf, job, "n2"), 180, "n2's own job end after the heal")
    for _ in range(3):  # later sweeps find nothing left to do
        report = sweep_on(bed, "n1")
        assert not [o for o in report.get("outcomes", []) if str(o.get("job_id")) == str(job)], report  # type: ignore[union-attr]
    revs = revisions_of(image, job)
    assert len(revs) == 1 and revs[0]["who"]["node"] == "n2", revs  # type: ignore[index]
    print(f"\ncut: {len(beats)} sweeps over {healed - cut:.0f}s left n2's image alone; job end on n2 "
          f"{took:.1f}s after the heal, exactly once")
    assert_prefix(overlay_file(image, "progress.log"), job)
    assert_consistent(image)
    assert holder(conf, image) is None
