"""Issue 18 on the real cluster: every job end records a revision in the image (job id,
cluster, user, node, exit state), read back with `sifoverlay log --json`; a rw job is
refused at Prolog when the overlay is too full; resize, then a job uses the new space;
compact lowers the file's allocated blocks after a job deleted a large file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.conftest import Cluster, User, sh
from tests.slurm.test_jobs import WRITER, assert_reconciled, outdir, progress_lines, wait_for  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

SIFOVERLAY = str(REPO / ".venv" / "bin" / "sifoverlay")


def log_of(image: Path) -> list[dict]:
    done = sh(SIFOVERLAY, "log", "--json", str(image))
    return json.loads(done.stdout)["revisions"]


def cluster_name() -> str:
    found = re.search(r"^ClusterName\s*=\s*(\S+)", sh("scontrol", "show", "config").stdout, re.MULTILINE)
    assert found
    return found.group(1)


def test_job_ends_are_recorded_with_job_user_node_and_exit_state(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    base = log_of(image)
    assert [r["op"] for r in base] == ["create"]
    ok = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                        "--wrap", "echo one > /one.txt")
    assert cluster.wait_finished(ok) == "COMPLETED"
    d1 = assert_reconciled(cluster, image, ok)
    failed = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                            "--wrap", "echo two > /two.txt; exit 3")
    assert cluster.wait_finished(failed) == "FAILED"
    d2 = assert_reconciled(cluster, image, failed)
    killed = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                            "--wrap", WRITER)
    cluster.wait_state(killed, {"RUNNING"})
    wait_for(lambda: progress_lines(cluster, killed) >= 3, what="the job to write")
    sh("scancel", "-s", "KILL", str(killed))
    assert cluster.wait_finished(killed) == "CANCELLED"
    d3 = assert_reconciled(cluster, image, killed)

    revisions = log_of(image)
    print(json.dumps(revisions[:3], indent=1))
    assert [r["seq"] for r in revisions] == [4, 3, 2, 1]
    assert [r["op"] for r in revisions] == ["sync", "sync", "sync", "create"]
    name = cluster_name()
    for rev, job, old, new, state in ((revisions[2], ok, base[0]["overlay"]["new"], d1, "COMPLETED"),
                                      (revisions[1], failed, d1, d2, "FAILED (exit 3)"),
                                      (revisions[0], killed, d2, d3, "CANCELLED")):
        assert rev["overlay"] == {"old": old, "new": new}
        if state == "CANCELLED":  # slurmd ends the tasks with SIGTERM/SIGKILL: ExitCode 0:15 or 0:9; the
            # reconcile worker runs after the job left COMPLETING, so it sees the final state
            assert re.fullmatch(r"CANCELLED \(signal (9|15)\)", rev["who"]["exit_state"]), rev["who"]
            state = rev["who"]["exit_state"]
        assert rev["who"] == {"job_id": str(job), "cluster": name, "uid": alice.uid, "user": alice.name,
                              "node": cluster.host, "exit_state": state, "via": "worker"}, rev  # epilog_reconcile=async
        assert rev["bytes_hashed"] == 64 << 20
    assert revisions[1]["manifest"]["old"] == revisions[2]["manifest"]["new"]
    assert revisions[0]["manifest"]["old"] == revisions[1]["manifest"]["new"]


def fill_overlay(image: Path, leave: int) -> None:
    """Write one file into upper/ (as root, through debugfs) so that about `leave` bytes stay available."""
    from sifoverlay.engine.capacity import read_capacity
    from sifoverlay.ocisif import open_image

    fd = os.open(image, os.O_RDONLY)
    try:
        cap = read_capacity(str(image), fd)
    finally:
        os.close(fd)
    with open_image(str(image)) as img:
        offset = img.overlay.offset  # type: ignore[union-attr]
    filler = image.parent / "filler.bin"
    # random bytes (debugfs leaves zero blocks as holes); 1 KiB blocks: ~1/256 more for indirect blocks
    filler.write_bytes(os.urandom(int((cap.available_bytes - leave) / (1 + 1 / 250))))
    sh("debugfs", "-w", "-R", f"write {filler} upper/filler.bin", f"{image}?offset={offset}")
    filler.unlink()
    sh(SIFOVERLAY, "overlay", "sync", str(image))


def available(image: Path) -> int:
    return int(json.loads(sh(SIFOVERLAY, "overlay", "status", "--json", "--no-verify", str(image)).stdout)
               ["capacity"]["available_bytes"])


def test_rw_job_refused_at_prolog_for_a_full_overlay(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    """dev-cluster sets min_free=1M: below it a rw job fails with one line naming the image,
    before anything is mounted; a read-only job still runs; the image is untouched."""
    alice = slurm_users[0]
    image = make_image(alice)
    fill_overlay(image, 512 << 10)
    free = available(image)
    assert 0 < free < 1 << 20, free
    before = image.read_bytes()
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", "true", cwd="/")
    cluster.settle(cancel=False)
    assert done.returncode != 0
    assert f"overlay has {free} bytes free, less than the required 1048576 (min_free)" in done.stderr, done.stderr
    assert image.read_bytes() == before
    ro = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}:ro", "true", cwd="/")
    cluster.settle(cancel=False)
    assert ro.returncode == 0, ro.stderr


def test_resize_then_a_job_uses_the_new_space(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    """A 64 MiB overlay with a file in it is grown to 256 MiB by root (resize2fs runs as the
    image's owner); the next job writes 150 MiB, which did not fit before."""
    alice = slurm_users[0]
    image = make_image(alice)
    job = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                         "--wrap", "dd if=/dev/urandom of=/keep.bin bs=1M count=8 2>/dev/null; md5sum /keep.bin > /keep.md5")
    assert cluster.wait_finished(job) == "COMPLETED"
    assert_reconciled(cluster, image, job)
    assert available(image) < 150 << 20
    done = sh(SIFOVERLAY, "overlay", "resize", "--size", "256M", "--json", str(image))
    assert json.loads(done.stdout)["layer_size"] == 256 << 20
    assert available(image) > 180 << 20
    big = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                         "--wrap", "dd if=/dev/urandom of=/big.bin bs=1M count=150 2>/dev/null && md5sum -c /keep.md5")
    assert cluster.wait_finished(big) == "COMPLETED", (outdir / f"{big}.out").read_text()
    assert_reconciled(cluster, image, big)
    check = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}:ro", "stat", "-c", "%s", "/big.bin", cwd="/")
    cluster.settle(cancel=False)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == [str(150 << 20)]
    ops = [r["op"] for r in log_of(image)]
    assert ops[:3] == ["sync", "resize", "sync"]


def test_compact_after_a_job_deleted_a_large_file(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, outdir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    write = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                           "--wrap", "dd if=/dev/urandom of=/big.bin bs=1M count=40 2>/dev/null; echo small > /keep.txt")
    assert cluster.wait_finished(write) == "COMPLETED"
    assert_reconciled(cluster, image, write)
    delete = cluster.sbatch(alice, f"--oci-sif-overlay={image}", "-o", f"{outdir}/%j.out", "-D", "/",
                            "--wrap", "rm /big.bin")
    assert cluster.wait_finished(delete) == "COMPLETED"
    assert_reconciled(cluster, image, delete)
    before = int(sh("stat", "-c", "%b", str(image)).stdout)
    done = json.loads(sh(SIFOVERLAY, "overlay", "compact", "--json", str(image)).stdout)
    after = int(sh("stat", "-c", "%b", str(image)).stdout)
    print(f"stat -c %b: {before} -> {after} (512-byte blocks); punched {done['punched_bytes']}")
    assert done["action"] == "compacted" and (before, after) == (done["blocks_before"], done["blocks_after"])
    assert (before - after) * 512 >= 39 << 20
    recorded, actual = __import__("tests.slurm.test_jobs", fromlist=["ext3_sha256"]).ext3_sha256(image)
    assert recorded == actual == done["new_digest"]
    read = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", "cat", "/keep.txt", cwd="/")
    cluster.settle(cancel=False)
    assert read.returncode == 0 and read.stdout == "small\n", read.stderr
    assert [r["op"] for r in log_of(image)][:2] == ["sync", "compact"] or \
        [r["op"] for r in log_of(image)][:1] == ["compact"]
