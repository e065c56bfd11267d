"""Multi-node rules (docs/slurm.md "Multi-node rules"): `:ro` mounts the image on every node
of the job; `:rw` is for single-node jobs only, refused with one line naming the rule at
submit time (job_submit.lua) and again by the Prolog on every node before anything touches
the image."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from sifoverlay.errors import SifOverlayError
from sifoverlay.slurm.multinode import RULE, check_rw_allowed, count_hosts, wait_for_ending_holders
from tests.cluster.conftest import NODES, Bed, User, overlay_status

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.slow]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hostlist_counts() -> None:
    assert [count_hosts(x) for x in ("", "n1", "n[1-3]", "n[1-3,5],gpu07", "a[1-2]b[7-9]")] == [0, 1, 3, 5, 6]


def test_prolog_refuses_rw_on_more_than_one_node() -> None:
    with pytest.raises(SifOverlayError) as refused:
        check_rw_allowed("/img.oci.sif", "42", {"SLURM_JOB_NODELIST": "n[1-2]"})
    assert refused.value.message() == f"/img.oci.sif: {RULE} (job 42 has 2 nodes)"
    check_rw_allowed("/img.oci.sif", "43", {})  # no allocation (not run by slurmd): nothing to refuse


def test_prolog_waits_only_for_holders_slurm_has_ended() -> None:
    no_ctld = {"SLURM_CONF": "/nonexistent/slurm.conf"}
    assert wait_for_ending_holders(lambda: [], timeout=5, env=no_ctld) is True
    # a non-Slurm holder, or a job slurmctld cannot tell about: refuse at once, never wait
    assert wait_for_ending_holders(lambda: [("k8s", "pod-1")], timeout=60, env=no_ctld) is False
    assert wait_for_ending_holders(lambda: [("slurm", "41")], timeout=60, env=no_ctld) is False
    calls = []

    def releasing() -> list[tuple[str, str]]:
        calls.append(1)
        return []

    assert wait_for_ending_holders(releasing, timeout=5, env=no_ctld) is True and len(calls) == 1


def test_prolog_waits_only_while_the_holders_epilog_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPLETING: the holder's Epilog still runs (it reconciles and releases): wait. Any other
    end state: its Epilog is over and LEFT the lease (a failed reconcile, for the sweeper):
    refuse at once. The f1 attack made every Epilog fail and the next Prolog waited 630 s."""
    from sifoverlay.slurm import multinode

    states = iter(["COMPLETING", "COMPLETING", "COMPLETED"])
    asked: list[str] = []

    def job_state(job_id: str, env: object) -> str:
        asked.append(job_id)
        return next(states)

    monkeypatch.setattr(multinode, "_job_state", job_state)
    assert wait_for_ending_holders(lambda: [("slurm", "7")], timeout=600, poll=0.01) is False
    assert asked == ["7", "7", "7"]
    for ended in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        monkeypatch.setattr(multinode, "_job_state", lambda job_id, env, s=ended: s)
        assert wait_for_ending_holders(lambda: [("slurm", "7")], timeout=600, poll=0.01) is False
    released = iter([[("slurm", "8")], [("slurm", "8")], []])
    monkeypatch.setattr(multinode, "_job_state", lambda job_id, env: "COMPLETING")
    assert wait_for_ending_holders(lambda: next(released), timeout=600, poll=0.01) is True


def test_a_reader_waits_for_the_writer_only_not_its_own_jobs_readers(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """A -N3 :ro job's Prologs wait together for the ending writer; the first node to get its
    reader lease must not make the others give up ("held by job 11", their own job). A rw
    job still counts every reader."""
    from types import SimpleNamespace

    from sifoverlay.engine import lease
    from sifoverlay.slurm import multinode, prolog
    from sifoverlay.slurm.config import SlurmConfig
    from sifoverlay.slurm.jobenv import JobEnv

    writer = [SimpleNamespace(source="slurm", job_id="10")]
    readers = [SimpleNamespace(source="slurm", job_id="11")]  # job 11's lease of another node

    def inspect(*_: object, **__: object) -> object:
        return writer.pop() if writer else None  # the writer's end is over after one look

    monkeypatch.setattr(lease, "inspect", inspect)
    monkeypatch.setattr(lease, "readers", lambda *_, **__: list(readers))
    monkeypatch.setattr(multinode, "_job_state", lambda job_id, env: {"10": "COMPLETING"}.get(job_id, "RUNNING"))
    monkeypatch.setattr(multinode.time, "sleep", lambda _: None)
    identity = SimpleNamespace(fd=-1, path="/img.sif")
    config = SlurmConfig(journal_dir=str(tmp_path / "journal"))
    ro = JobEnv("11", 1000, 1000, "u", "/img.sif", "ro", None)
    assert prolog._wait_for_ending_holders(identity, ro, config) is True  # type: ignore[arg-type]
    readers[:] = [SimpleNamespace(source="slurm", job_id="12")]  # another job's reader: a rw job waits for it
    rw = JobEnv("13", 1000, 1000, "u", "/img.sif", "rw", None)
    assert prolog._wait_for_ending_holders(identity, rw, config) is False  # type: ignore[arg-type]


def test_rw_on_two_nodes_is_refused_at_submit(bed: Bed, bed_users: tuple[User, User], bed_image, bed_out: Path) -> None:
    alice = bed_users[0]
    image = bed_image(alice)
    before = sha256(image)
    want = f"--oci-sif-overlay={image}:rw: {RULE}"
    for argv in (["sbatch", "-N2", "--wrap", "true"], ["sbatch", "-N1-3", "--wrap", "true"],
                 ["sbatch", "--array=1-3", "-N2", "--wrap", "true"],
                 ["salloc", "-N2", "true"], ["srun", "-N2", "true"]):
        done = bed.as_user(alice, argv[0], f"--oci-sif-overlay={image}:rw", *argv[1:], cwd=str(bed_out))
        assert done.returncode != 0, (argv, done.stdout)
        assert want in done.stderr, (argv, done.stderr)
    assert bed.run("squeue", "-h", "-u", alice.name).stdout == ""
    assert sha256(image) == before


def test_heterogeneous_rw_job_is_refused(bed: Bed, bed_users: tuple[User, User], bed_image, bed_out: Path) -> None:
    alice = bed_users[0]
    image = bed_image(alice)
    script = bed_out / "het.sh"
    script.write_text(f"#!/bin/sh\n#SBATCH -N1 --oci-sif-overlay={image}:rw\n#SBATCH hetjob\n#SBATCH -N1\ntrue\n")
    done = bed.as_user(alice, "sbatch", str(script), cwd=str(bed_out))
    assert done.returncode != 0
    assert f"--oci-sif-overlay={image}:rw: {RULE} (a heterogeneous job" in done.stderr


def test_rw_step_in_a_two_node_allocation_never_mounts(bed: Bed, bed_users: tuple[User, User], bed_image,
                                                       bed_out: Path) -> None:
    """The image given only to `srun -N2` inside an allocation made without it: no Prolog
    prepared it, so every task fails and nothing is mounted on any node."""
    alice = bed_users[0]
    image = bed_image(alice)
    before = sha256(image)
    done = bed.as_user(alice, "salloc", "-N2", "srun", "-N2", f"--oci-sif-overlay={image}:rw", "true",
                       cwd=str(bed_out))
    assert done.returncode != 0
    assert "no rootfs was prepared for this job" in done.stderr
    job = bed.sbatch(alice, "-N2", "-o", str(bed_out / "%j.out"), "--wrap",
                     f"srun -N2 --oci-sif-overlay={image}:rw true", cwd=str(bed_out))
    assert bed.wait_finished(job) == "FAILED"
    assert "no rootfs was prepared for this job" in (bed_out / f"{job}.out").read_text()
    for node in NODES:
        assert str(image) not in bed.mounts(node)
    assert sha256(image) == before


def test_ro_on_three_nodes_while_a_writer_runs_on_another_image(bed: Bed, bed_users: tuple[User, User], bed_image,
                                                                bed_out: Path) -> None:
    alice = bed_users[0]
    shared, private = bed_image(alice, "shared.oci.sif"), bed_image(alice, "private.oci.sif")
    shared_before = sha256(shared)
    writer = bed.sbatch(alice, "-N1", f"--oci-sif-overlay={private}:rw", "-o", str(bed_out / "w-%j.out"),
                        "--wrap", "echo written > /w.txt; sleep 12", cwd=str(bed_out))
    bed.wait_state(writer, {"RUNNING"})
    time.sleep(1)  # the writer's Prolog has mounted its image
    done = bed.as_user(alice, "srun", "-N3", f"--oci-sif-overlay={shared}:ro", "sh", "-c",
                       "echo $(hostname) $(head -1 /etc/passwd | cut -d: -f1) $(busybox 2>&1 | head -1 | cut -d\" \" -f1)",
                       cwd=str(bed_out))
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"{node} root BusyBox" for node in NODES]
    assert bed.job_state(writer) == "RUNNING"  # the reader job ran while the writer held its image
    assert bed.wait_finished(writer) == "COMPLETED"
    check = bed.as_user(alice, "srun", "-N1", f"--oci-sif-overlay={private}:ro", "cat", "/w.txt", cwd=str(bed_out))
    assert check.stdout == "written\n", check.stderr
    assert overlay_status(shared) == f"{shared}: clean"
    assert sha256(shared) == shared_before  # three read-only mounts wrote nothing
    assert overlay_status(private) == f"{private}: clean"


def test_prolog_waits_for_a_job_end_that_holds_a_lease_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job end that won back its expired lease, or a sweeper that took a dead node's job
    end over, reconciles under a new lease whose source is "sync" (engine.sync), with the
    job's id. While it holds the job-end lock, a next writer waits for it; in the 200-job
    soak two writers were refused 'held by job 202 (sync)' instead. A "sync" holder that
    nobody is ending (a user's CLI sync) is refused at once, as before."""
    from sifoverlay.slurm import multinode

    monkeypatch.setattr(multinode, "_job_state", lambda job_id, env: "COMPLETED")
    released = iter([[("sync", "202")], [("sync", "202")], []])
    assert wait_for_ending_holders(lambda: next(released), timeout=600, poll=0.01,
                                   ending=lambda job_id: job_id == "202") is True
    assert wait_for_ending_holders(lambda: [("sync", "sync-4242")], timeout=600, poll=0.01,
                                   ending=lambda job_id: job_id == "202") is False
