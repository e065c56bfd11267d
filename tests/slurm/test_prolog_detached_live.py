"""prolog_mounts=detached on the live cluster (the default; issue 17 item 1): the Prolog
exits once the job holds its lease and the mounts go on beside slurmd's start of the job;
the plugin's task waits for the rootfs while the mounter lives, and fails with one line
when the mounter died or refused after letting the Prolog go."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from sifoverlay.engine.procs import process_start_ticks
from sifoverlay.slurm import records
from sifoverlay.slurm.config import load_config
from sifoverlay.slurm.phases import records_of_job, timing_path
from tests.slurm.conftest import Cluster, User
from tests.slurm.test_jobs import assert_reconciled

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_the_prolog_exits_before_the_rootfs_is_mounted(cluster: Cluster, slurm_users: tuple[User, User],
                                                       make_image, mode: str) -> None:  # type: ignore[no-untyped-def]
    assert load_config().prolog_mounts == "detached"
    alice = slurm_users[0]
    image = make_image(alice)
    write = "echo hi > /detached.txt; " if mode == "rw" else ""
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}:{mode}", "sh", "-c",
                           f"{write}echo $SLURM_JOB_ID; cat /etc/hostname >/dev/null; ls /bin/busybox", cwd="/")
    assert done.returncode == 0, done.stderr
    job, listed = done.stdout.split()
    assert listed == "/bin/busybox"  # the task ran inside the image's rootfs
    cluster.settle(cancel=False)
    prolog = records_of_job(timing_path() or "", job)["prolog"]
    assert prolog["result"] == "ready", prolog
    phases, marks = prolog["phases"], prolog["marks"]
    assert isinstance(phases, dict) and isinstance(marks, dict)
    assert "release" in phases and "mounts" in phases, prolog
    # slurmd saw the Prolog end before the mounts began: the mounts are not on its clock
    assert marks["prolog_exit"] + phases["mounts"] <= prolog["total"], prolog  # type: ignore[operator]
    assert not (cluster.runtime_dir / "slurm" / job).exists()  # the Epilog removed the record
    if mode == "rw":
        assert_reconciled(cluster, image, int(job))


def _shared_dir(image: Path) -> Path:
    """A directory the job user and the test both write (the batch script's handshake)."""
    where = image.parent / "handshake"
    where.mkdir(mode=0o777)
    os.chmod(where, 0o777)
    return where


def _wait_file(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.1)
    return path.read_text()


STEP = """srun -n1 sh -c 'ls /bin/busybox' > {d}/{n}.out 2>&1; echo $? > {d}/{n}.rc.tmp; mv {d}/{n}.rc.tmp {d}/{n}.rc"""


def test_a_task_waits_for_a_live_mounter_and_fails_when_it_died(cluster: Cluster, slurm_users: tuple[User, User],
                                                               make_image) -> None:  # type: ignore[no-untyped-def]
    """The job's record is set to ``preparing`` by hand between two steps of a running job
    (the batch script stays on the host): with a live mounter the step's task waits until
    the record says ready; with a dead one it fails at once with one line that says so."""
    alice = slurm_users[0]
    image = make_image(alice)
    d = _shared_dir(image)
    script = d / "job.sh"
    script.write_text("#!/bin/sh\n"
                      f"touch {d}/started\n"
                      f"while [ ! -e {d}/go1 ]; do sleep 0.05; done\n"
                      f"a=$(cut -d' ' -f1 /proc/uptime)\n" + STEP.format(d=d, n="step1") + "\n"
                      f"b=$(cut -d' ' -f1 /proc/uptime); echo $a $b > {d}/step1.t\n"
                      f"while [ ! -e {d}/go2 ]; do sleep 0.05; done\n" + STEP.format(d=d, n="step2") + "\n")
    script.chmod(0o755)
    config = load_config()
    job = cluster.sbatch(alice, f"--oci-sif-overlay={image}:ro", "--oci-sif-batch=host", "-D", "/", "-o", f"{d}/job.log",
                         str(script))
    try:
        cluster.wait_state(job, {"RUNNING"})  # RUNNING includes the Prolog's time (PrologFlags=Alloc)
        deadline = time.monotonic() + 60
        while (ready := records.read(config.records_dir, str(job))) is None or ready.status != "ready":
            assert time.monotonic() < deadline and (ready is None or ready.status == "preparing"), ready
            time.sleep(0.05)
        # The batch step's own task waits for the record too: only once the script runs is
        # the record ours to play with (else the script itself waits for the stand-in).
        _wait_file(d / "started")

        def restore() -> None:
            records.write_ready(config.records_dir, str(job), ready.image, ready.mode, ready.rootfs,
                                requested=ready.requested)

        mounter = subprocess.Popen(["sleep", "60"])  # stands in for a mounter still at work
        try:
            started = process_start_ticks(mounter.pid)
            assert started is not None
            records.write_preparing(config.records_dir, str(job), ready.image, ready.mode,
                                    preparer=(mounter.pid, started))
            (d / "go1").touch()
            time.sleep(1.5)
            restore()  # the mounts are done
        finally:
            mounter.kill()
            mounter.wait()
        assert _wait_file(d / "step1.rc").strip() == "0", (d / "step1.out").read_text()
        assert (d / "step1.out").read_text() == "/bin/busybox\n"
        began, ended = map(float, _wait_file(d / "step1.t").split())
        assert ended - began >= 1.0, (began, ended)  # it waited for the record, then ran

        dead = subprocess.Popen(["sleep", "0.1"])
        started = process_start_ticks(dead.pid)
        dead.wait()
        assert started is not None
        records.write_preparing(config.records_dir, str(job), ready.image, ready.mode, preparer=(dead.pid, started))
        (d / "go2").touch()
        assert _wait_file(d / "step2.rc").strip() != "0"
        out = (d / "step2.out").read_text()
        assert (f"{ready.image}: the Prolog's mounter (pid {dead.pid}) ended before the rootfs was ready "
                "(the node's sifoverlay log says why)") in out, out
        restore()
        assert cluster.wait_finished(job) == "COMPLETED"
    finally:
        (d / "go1").touch()
        (d / "go2").touch()
    cluster.settle(cancel=False)
    assert not (cluster.runtime_dir / "slurm" / str(job)).exists()
    assert not cluster.session_path(job).exists()


def test_a_mount_that_fails_after_the_release_refuses_the_job_and_leaves_nothing(
        cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    """A layer that squashfuse cannot mount is found by the mounter after the Prolog has
    gone: the job's task fails with the refusal naming the image, and the mounter undid
    its lease and session as an inline Prolog would."""
    from sifoverlay.ocisif import open_image

    alice = slurm_users[0]
    image = make_image(alice)
    with open_image(image) as img:
        layer = img.layers[0]
        offset = layer.offset
    with open(image, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * 4096)  # the squashfs superblock: not a filesystem any more
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}:ro", "sh", "-c", "echo $SLURM_JOB_ID",
                           cwd="/")
    assert done.returncode != 0
    found = re.search(rf"sifoverlay: job (\d+): refused: {re.escape(str(image))}: (.*)", done.stderr)
    assert found is not None, done.stderr
    job = found.group(1)
    assert done.stderr.count("refused:") == 1, done.stderr  # one line
    cluster.settle(cancel=False)
    prolog = records_of_job(timing_path() or "", job)["prolog"]
    assert prolog["result"] == "refused" and "release" in prolog["phases"], prolog  # type: ignore[operator]
    from sifoverlay.engine import lease

    assert lease.inspect(str(image), state_dir=load_config().state_dir) is None
    assert lease.readers(str(image), state_dir=load_config().state_dir) == []
    assert not cluster.session_path(int(job)).exists()
    assert not (cluster.runtime_dir / "mounts" / job).exists()
