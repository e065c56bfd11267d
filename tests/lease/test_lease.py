"""Single-writer lease: real processes, real lease files, real OFD/POSIX locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sifoverlay.engine import lease, leaselock
from sifoverlay.errors import ImageBusy
from sifoverlay.fsio import CountingIO

from .conftest import REGION

HOST = socket.gethostname()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def holder(job: str = "1234", source: str = "slurm", pid: int | None = None) -> lease.Holder:
    if pid is None:
        return lease.Holder.current(job, source)
    return lease.Holder(HOST, pid, job, source)


def leftovers(image: Path) -> list[str]:
    """Files in the state directory's lease directory (records live there, never beside the image)."""
    assert sorted(os.listdir(image.parent)) == [image.name] or all(
        not n.startswith(f".{image.name}") for n in os.listdir(image.parent)), "nothing may be written beside the image"
    leases = Path(os.environ["SIFOVERLAY_STATE_DIR"]) / "leases"
    return sorted(os.listdir(leases)) if leases.is_dir() else []


def test_acquire_writes_durable_record_and_release_removes_it(image: Path) -> None:
    io = CountingIO(keep_log=True)
    with lease.acquire(image, holder(), ttl=60, region=REGION, io=io) as held:
        from sifoverlay.engine import statedir

        key = statedir.key_of_path(str(image))
        path = Path(os.environ["SIFOVERLAY_STATE_DIR"]) / "leases" / f"{key}.lease"
        assert lease.lease_path(image) == str(path)
        assert held.key == key and record_key(path) == key
        record = json.loads(path.read_text())
        assert (record["host"], record["pid"], record["job_id"], record["source"]) == (HOST, os.getpid(), "1234", "slurm")
        assert record["uid"] == os.getuid()
        assert record["expires"] == pytest.approx(record["heartbeat"] + 60)
        assert record["region"] == list(REGION)
        assert record["mode"] == "exclusive"
        assert record["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert record["started"] == lease.process_start_ticks(os.getpid())
        assert leftovers(image) == [path.name]  # temp file gone
        ops = [op for op, _ in io.log]
        # record fsynced before it is linked into place; the directory fsynced after
        assert ops.index("fsync") < ops.index("link") < ops.index("fsync_dir")
        info = lease.inspect(image)
        assert info is not None and info.alive and info.token == held.token
    assert lease.inspect(image) is None
    assert leftovers(image) == []
    assert held.release() is False  # idempotent


def test_refusal_names_the_holder(image: Path) -> None:
    with lease.acquire(image, holder("1234", "slurm"), ttl=60, region=REGION) as held:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(held.info.acquired))
        with pytest.raises(ImageBusy) as exc:
            lease.acquire(image, holder("99", "cli"), region=REGION)
        assert str(exc.value) == f"{image}: held by job 1234 (slurm) on host {HOST} pid {os.getpid()} since {since}"
        assert exc.value.exit_code == 75
        assert exc.value.holder["job_id"] == "1234"
        assert "\n" not in str(exc.value)


def test_concurrent_acquires_exactly_one_wins(image: Path, children) -> None:
    start_at = time.time() + 1.5
    procs = [children.start("acquire", image, f"job{i}", *REGION, 60, 2, start_at) for i in range(6)]
    lines = [children.line(p) for p in procs]
    winners = [line for line in lines if line.startswith("WIN")]
    losers = [line for line in lines if line.startswith("BUSY")]
    assert len(winners) == 1 and len(losers) == 5, lines
    info = lease.inspect(image)
    assert info is not None and f"WIN {info.token}" == winners[0]
    for line in losers:
        assert f"held by job {info.job_id} (test) on host {HOST} pid {info.pid}" in line
    for p in procs:
        p.wait(timeout=10)
    assert lease.inspect(image) is None
    assert leftovers(image) == []


def test_stale_lease_of_killed_process_is_broken(image: Path, children) -> None:
    proc = children.start("acquire", image, "777", *REGION, 0.5, 60)
    assert children.line(proc).startswith("WIN")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    info = lease.inspect(image)
    assert info is not None and info.pid == proc.pid
    if time.time() <= info.expires:  # dead but not yet expired: still honoured
        with pytest.raises(ImageBusy, match="held by job 777"):
            lease.acquire(image, holder(), region=REGION)
    time.sleep(max(0.0, info.expires - time.time()) + 0.1)
    assert not lease.inspect(image).alive
    with lease.acquire(image, holder("888"), ttl=60, region=REGION) as held:
        assert lease.inspect(image).job_id == "888" and held.token != info.token
    assert leftovers(image) == []


def test_expired_lease_of_live_process_is_not_broken(image: Path, children) -> None:
    proc = children.start("acquire", image, "555", *REGION, 0.2, 60)
    assert children.line(proc).startswith("WIN")
    time.sleep(0.4)
    info = lease.inspect(image)
    assert time.time() > info.expires and info.alive
    assert lease.break_stale(image) is False
    with pytest.raises(ImageBusy, match=f"held by job 555 \\(test\\) on host {HOST} pid {proc.pid}"):
        lease.acquire(image, holder(), region=REGION)


def test_recycled_pid_or_other_boot_is_dead(image: Path) -> None:
    # our own pid with another start time = pid reuse; our pid with another boot_id = reboot
    me = os.getpid()
    for started, boot in ((12345, None), (None, "not-this-boot")):
        forged = lease.Holder(HOST, me, "1", "test", os.getuid(), started)
        held = lease.acquire(image, forged, ttl=0.05, region=REGION)
        if boot is not None:
            write_record(image, dict(json.loads(Path(held.file_path).read_text()), boot_id=boot))
        os.close(held.lock_fd)  # drop only the byte lock: the lease file stays, like a crash
        held.lock_fd = None
        time.sleep(0.1)
        assert lease.inspect(image).alive is False
        assert lease.break_stale(image) is True
        assert lease.inspect(image) is None


def record_key(path: Path) -> str:
    return json.loads(path.read_text())["key"]


def write_record(image: Path, record: dict) -> None:
    path = Path(lease.lease_path(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_other_host_lease_needs_the_grace_period(image: Path) -> None:
    now = time.time()
    base = {"host": "node-elsewhere", "pid": 1, "job_id": "42", "source": "slurm", "uid": 0,
            "acquired": now - 100, "heartbeat": now - 100, "ttl": 30.0, "expires": now - 70,
            "boot_id": "x", "mode": "exclusive", "token": "t1", "region": list(REGION)}
    write_record(image, base)
    assert lease.break_stale(image, grace=600) is False  # expired 70 s ago, grace 600 s
    with pytest.raises(ImageBusy, match="held by job 42 \\(slurm\\) on host node-elsewhere pid 1"):
        lease.acquire(image, holder(), region=REGION, grace=600)
    with lease.acquire(image, holder("43"), region=REGION, grace=60) as held:  # 70 s > 60 s grace
        assert lease.inspect(image).job_id == "43" and held.info.host == HOST


def test_torn_lease_file_is_judged_by_mtime(image: Path) -> None:
    path = Path(lease.lease_path(image))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"host": "n')
    with pytest.raises(ImageBusy, match="held by job \\? \\(unknown\\)"):
        lease.acquire(image, holder(), region=REGION)
    old = time.time() - 10_000
    os.utime(path, (old, old))
    with lease.acquire(image, holder("5"), region=REGION):
        assert lease.inspect(image).job_id == "5"


def test_concurrent_breakers_exactly_one_breaks(image: Path, children) -> None:
    now = time.time()
    write_record(image, {"host": HOST, "pid": dead_pid(), "job_id": "9", "source": "slurm",
                         "acquired": now - 50, "heartbeat": now - 50, "ttl": 1.0, "expires": now - 49,
                         "mode": "exclusive", "token": "dead"})
    start_at = time.time() + 1.5
    procs = [children.start("break", image, start_at) for _ in range(5)]
    results = sorted(children.line(p) for p in procs)
    assert results == ["BROKE False"] * 4 + ["BROKE True"]
    assert lease.inspect(image) is None and leftovers(image) == []


def test_heartbeat_extends_and_detects_a_lost_lease(image: Path) -> None:
    held = lease.acquire(image, holder(), ttl=1, region=REGION)
    first = held.info.expires
    time.sleep(0.05)
    info = held.heartbeat(ttl=120)
    assert info.expires > first + 100 and lease.inspect(image).expires == info.expires
    assert leftovers(image) == [Path(held.file_path).name]
    # someone broke it and took it: the heartbeat must not clobber the new holder
    write_record(image, {"host": "other", "pid": 1, "job_id": "77", "source": "k8s", "acquired": 1.0,
                         "heartbeat": time.time(), "ttl": 60.0, "token": "theirs"})
    with pytest.raises(ImageBusy, match="lease lost; job 77 \\(k8s\\) on host other pid 1"):
        held.heartbeat()
    assert held.release() is False  # not ours: left alone
    assert lease.inspect(image).token == "theirs"


def test_wait_polls_until_released(image: Path, children) -> None:
    proc = children.start("acquire", image, "1", *REGION, 60, 0.6)
    assert children.line(proc).startswith("WIN")
    t0 = time.monotonic()
    with lease.acquire(image, holder("2"), region=REGION, wait=10) as held:
        assert 0.3 < time.monotonic() - t0 < 10
        assert held.info.job_id == "2"
    proc2 = children.start("acquire", image, "3", *REGION, 60, 30)
    assert children.line(proc2).startswith("WIN")
    t0 = time.monotonic()
    with pytest.raises(ImageBusy, match="held by job 3"):
        lease.acquire(image, holder("4"), region=REGION, wait=0.5)
    assert time.monotonic() - t0 >= 0.5


def test_resume_releases_from_another_process(image: Path, children) -> None:
    proc = children.start("acquire", image, "prolog-1", *REGION, 60, 0)
    token = children.line(proc).split()[1]
    proc.wait()
    # the child released on exit; take one that outlives its process instead
    held = lease.acquire(image, lease.Holder(HOST, os.getpid(), "job-5", "slurm"), ttl=60, region=REGION)
    assert token != held.token
    os.close(held.lock_fd)
    held.lock_fd = None  # the acquiring "process" is gone, the lease file stays
    assert lease.resume(image, "other-job") is None
    resumed = lease.resume(image, "job-5")
    assert resumed is not None and resumed.token == held.token and resumed.lock_fd is None
    assert resumed.release() is True and lease.inspect(image) is None


def test_ofd_lock_conflicts_with_posix_lock_of_another_process(image: Path, children) -> None:
    # SingularityCE native mode: F_SETLK write lock over the ext3 range
    posix = children.start("posix-write", image, *REGION, 60)
    assert children.line(posix) == "LOCKED"
    with pytest.raises(ImageBusy) as exc:
        lease.acquire(image, holder(), region=REGION)
    assert str(exc.value).startswith(f"{image}: held by pid {posix.pid} on this host (write byte-range lock")
    with pytest.raises(ImageBusy, match=f"held by pid {posix.pid}"):
        lease.acquire_shared(image, holder(), region=REGION)
    assert lease.inspect(image) is None and leftovers(image) == []  # nothing half-created
    # a lock on a disjoint range does not conflict
    with lease.acquire(image, holder(), region=(REGION[0] + REGION[1], 4096)):
        pass
    posix.kill()
    posix.wait()
    with lease.acquire(image, holder(), region=REGION):
        other = children.start("posix-read", image, *REGION, 0)  # and the other way round
        assert children.line(other).startswith("BUSY")
        other.wait()


def test_posix_read_lock_allows_shared_refuses_exclusive(image: Path, children) -> None:
    posix = children.start("posix-read", image, *REGION, 60)
    assert children.line(posix) == "LOCKED"
    with lease.acquire_shared(image, holder(), region=REGION) as ro:
        assert ro.shared
    with pytest.raises(ImageBusy, match=f"held by pid {posix.pid} on this host \\(read byte-range lock"):
        lease.acquire(image, holder(), region=REGION)


def test_shared_and_exclusive(image: Path, children) -> None:
    r1 = lease.acquire_shared(image, holder("r1"), region=REGION)
    r2 = children.start("shared", image, "r2", *REGION, 60, 60)
    assert children.line(r2).startswith("WIN")
    assert sorted(r.job_id for r in lease.readers(image)) == ["r1", "r2"]
    assert lease.inspect(image) is None
    with pytest.raises(ImageBusy, match="held read-only by job r1"):
        lease.acquire(image, holder("w"), region=REGION)
    r2.kill()
    r2.wait()
    r1.release()
    # r2 was killed: its reader file is left; the byte lock went with it. Still live by ttl.
    with pytest.raises(ImageBusy, match="held read-only by job r2"):
        lease.acquire(image, holder("w"), region=REGION)
    assert lease.inspect(image) is None  # the refused writer removed its own file
    stale = lease.readers(image)[0]
    write_reader = dict(stale.record, expires=time.time() - 1, heartbeat=time.time() - 2)
    Path(stale.path).write_text(json.dumps(write_reader))
    with lease.acquire(image, holder("w"), region=REGION) as w:
        assert lease.readers(image) == []  # the dead reader's file was removed
        with pytest.raises(ImageBusy, match="held by job w"):
            lease.acquire_shared(image, holder("r3"), region=REGION)
        assert lease.readers(image) == []  # refused reader left nothing
        w_token = w.token
    assert lease.inspect(image) is None and w_token
    assert leftovers(image) == []


def test_shared_refused_by_writer_on_another_node(image: Path) -> None:
    now = time.time()
    write_record(image, {"host": "node9", "pid": 3, "job_id": "600", "source": "slurm", "acquired": now,
                         "heartbeat": now, "ttl": 300.0, "expires": now + 300, "token": "w"})
    with pytest.raises(ImageBusy, match="held by job 600 \\(slurm\\) on host node9 pid 3"):
        lease.acquire_shared(image, holder(), region=REGION)
    assert lease.readers(image) == []


def test_image_fd_locks_the_opened_inode_not_the_path(image: Path, tmp_path: Path) -> None:
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        decoy = tmp_path / "decoy"
        decoy.write_bytes(b"x")
        os.rename(image, tmp_path / "moved")
        os.rename(decoy, image)  # the name now points elsewhere
        held = lease.acquire(image, holder(), region=REGION, image_fd=fd)
        moved_fd = os.open(tmp_path / "moved", os.O_RDWR)
        try:
            import fcntl
            import struct

            probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, *REGION, 0)
            with pytest.raises(BlockingIOError):
                fcntl.fcntl(moved_fd, leaselock.F_OFD_SETLK, probe)
        finally:
            os.close(moved_fd)
        held.release()
    finally:
        os.close(fd)


def test_region_is_looked_up_from_the_image(vectors: Path, tmp_path: Path) -> None:
    """Without region=, the lock covers the ext3 overlay of a real OCI-SIF (whole file
    when the image has no overlay)."""
    from sifoverlay import engine
    from sifoverlay.ocisif import open_image
    from sifoverlay.ocisif.importer import import_image
    from tests.conftest import require_tool

    require_tool("mkfs.ext3", "mksquashfs")
    image = tmp_path / "bb.oci.sif"
    import_image(vectors / "singularity" / "busybox_amd64.sif", image)
    with lease.acquire(image, holder(), ttl=60) as held:
        assert held.info.region == (0, 0)
    engine.create_overlay(image, size_mib=64, sparse=True, journal_dir=tmp_path / "journal")
    with open_image(image) as img:
        expected = (img.overlay.offset, img.overlay.size)
    with lease.acquire(image, holder(), ttl=60) as held:
        assert held.info.region == expected
        assert json.loads(Path(held.file_path).read_text())["region"] == list(expected)


def test_temp_files_of_killed_processes_are_swept(image: Path) -> None:
    base = lease.lease_path(image)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    dead = dead_pid()
    left = [f"{base}.hb.{HOST}.{dead}.ab12cd34", f"{base}.new.{HOST}.{dead}.00ff00ff",
            f"{base}.tomb.{HOST}.{dead}.11111111"]
    alive = f"{base}.new.{HOST}.{os.getpid()}.22222222"  # an acquirer still at work
    foreign = f"{base}.hb.othernode.{dead}.33333333"  # another host: only by age
    for path in (*left, alive, foreign):
        Path(path).write_text("{}")
    with lease.acquire(image, holder(), region=REGION):
        remaining = sorted(leftovers(image))
    assert remaining == sorted(os.path.basename(p) for p in (base, alive, foreign))


# -- readers beside a writer that only hashes and commits (issue 17: phase "reconciling") ----
def test_readers_join_a_reconciling_writer_and_writers_still_wait(image: Path, children) -> None:
    w = lease.acquire(image, holder("w"), region=REGION)
    w.unlock_range()  # the Slurm job end: the ext3 FUSE daemon that held the byte lock is gone
    with pytest.raises(ImageBusy, match="held by job w"):
        lease.acquire_shared(image, holder("r0"), region=REGION)  # still writing: readers wait
    assert lease.readers(image) == []
    w.set_phase(lease.READERS_ADMITTED)
    info = lease.inspect(image)
    assert info is not None and info.record["phase"] == "reconciling" and info.token == w.token
    assert lease.admits_readers(info)
    r1 = lease.acquire_shared(image, holder("r1"), region=REGION)
    r2 = children.start("shared", image, "r2", *REGION, 60, 60)  # another process too
    assert children.line(r2).startswith("WIN")
    assert sorted(r.job_id for r in lease.readers(image)) == ["r1", "r2"]
    with pytest.raises(ImageBusy, match="held by job w"):
        lease.acquire(image, holder("w2"), region=REGION)  # a writer never joins
    beat = w.heartbeat()
    assert beat.record["phase"] == "reconciling"  # heartbeats keep the phase
    w.set_phase(None)
    with pytest.raises(ImageBusy, match="held by job w"):
        lease.acquire_shared(image, holder("r3"), region=REGION)
    w.release()
    with pytest.raises(ImageBusy, match="held read-only by job r1"):
        lease.acquire(image, holder("w2"), region=REGION)  # the readers that joined keep writers out
    r1.release()
    r2.kill()
    r2.wait()


def test_a_reconciling_writer_on_another_node_admits_readers_a_dead_one_is_broken(image: Path) -> None:
    now = time.time()
    base = {"host": "node9", "pid": 3, "job_id": "600", "source": "slurm", "acquired": now, "mode": "exclusive",
            "heartbeat": now, "ttl": 300.0, "expires": now + 300, "token": "w", "phase": "reconciling"}
    write_record(image, base)
    with lease.acquire_shared(image, holder("r"), region=REGION) as ro:
        assert ro.shared and lease.inspect(image).job_id == "600"  # type: ignore[union-attr]
    write_record(image, dict(base, phase="writing"))  # any other phase: refused as before
    with pytest.raises(ImageBusy, match="held by job 600"):
        lease.acquire_shared(image, holder("r"), region=REGION)
    # expired past its grace: not admitting anyone, broken as any stale writer
    write_record(image, dict(base, heartbeat=now - 1000, expires=now - 700, grace=60.0))
    assert not lease.admits_readers(lease.inspect(image))  # type: ignore[arg-type]
    with lease.acquire_shared(image, holder("r"), region=REGION):
        assert lease.inspect(image) is None


def test_metadata_lock_keeps_a_commit_from_a_reader_parsing(image: Path) -> None:
    reader = os.open(image, os.O_RDONLY)
    committer = os.open(image, os.O_RDWR)
    try:
        with leaselock.metadata_lock(reader, exclusive=False) as got:
            assert got is True
            second = os.open(image, os.O_RDONLY)
            try:
                with leaselock.metadata_lock(second, exclusive=False, timeout=0.1) as shared:
                    assert shared is True  # readers share it
            finally:
                os.close(second)
            with leaselock.metadata_lock(committer, exclusive=True, timeout=0.2) as granted:
                assert granted is False  # not granted: the commit would go on without it
        with leaselock.metadata_lock(committer, exclusive=True, timeout=0.2) as granted:
            assert granted is True
            other = os.open(image, os.O_RDONLY)
            try:
                with leaselock.metadata_lock(other, exclusive=False, timeout=0.1) as parsed:
                    assert parsed is False
            finally:
                os.close(other)
        # a descriptor not open for writing cannot take the write lock: never an error
        with leaselock.metadata_lock(reader, exclusive=True, timeout=0.1) as granted:
            assert granted is False
        # the lease's own locks never cover the header bytes the metadata lock uses
        assert leaselock.METADATA_RANGE[0] + leaselock.METADATA_RANGE[1] <= REGION[0]
    finally:
        os.close(reader)
        os.close(committer)


def test_metadata_lock_does_not_wait_for_a_whole_file_lease_lock(image: Path) -> None:
    """The commit of an overlay create runs under its own lease's write lock over the
    whole file (no overlay yet): the metadata lock must not wait for it (nor for anyone's
    lock that is not the metadata lock itself)."""
    with lease.acquire(image, holder("create"), region=(0, 0)):
        fd = os.open(image, os.O_RDWR)
        try:
            start = time.monotonic()
            with leaselock.metadata_lock(fd, exclusive=True, timeout=120) as granted:
                assert granted is False
            with leaselock.metadata_lock(fd, exclusive=False, timeout=120) as granted:
                assert granted is False
            assert time.monotonic() - start < 60  # gave up at once, not after its 120 s timeout
        finally:
            os.close(fd)


def test_a_record_of_an_earlier_boot_of_this_host_is_dead_before_it_expires(image: Path) -> None:
    """A node killed and booted again finds its own job's lease still within its ttl: the
    holder died with the old boot, so the record is dead at once (the 3-node soak's next
    writer on that node was refused 'held by job 47' for the rest of the ttl, and the
    record outlived the job's session). Another host's record within its ttl stays live."""
    now = time.time()
    base = {"host": HOST, "pid": os.getpid(), "job_id": "47", "source": "slurm", "acquired": now,
            "heartbeat": now, "ttl": 600.0, "expires": now + 600, "token": "t47", "mode": "exclusive",
            "boot_id": "an-earlier-boot"}
    write_record(image, base)
    assert lease.inspect(image).alive is False  # type: ignore[union-attr]
    with lease.acquire(image, holder("54"), region=REGION) as held:  # broken at once, not after 600 s
        assert held.info.job_id == "54"
    write_record(image, dict(base, boot_id=lease.boot_id()))  # this boot: our own live pid
    assert lease.inspect(image).alive is True  # type: ignore[union-attr]
    write_record(image, dict(base, host="another-node", boot_id="an-earlier-boot"))
    assert lease.inspect(image).alive is True  # type: ignore[union-attr]  # another host: its ttl counts
