"""The operator is SIGKILLed in the middle of a reconcile and restarted.

The first operator is a real `kopf run` subprocess whose engine I/O kills the process at
the N-th mutating operation (SIFOVERLAY_CRASH_AT, the project's crash harness). The
crash points are found by a dry run of the same reconcile on a copy of the image:
before the first appended blob (the commit must roll back), right before the metadata
write that is the commit point (roll forward) and right after the COMMITTED record
(only the clean-up remains). The second operator (KopfRunner) resumes: it must finish
the reconcile exactly once, and the result must equal one uninterrupted reconcile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine import sessions
from sifoverlay.engine.journal import Journal
from sifoverlay.fsio import CountingIO
from sifoverlay.k8s import metrics, names
from tests.k8s.conftest import (
    OPERATOR_SCRIPT, WAIT, Cluster, Site, kopf_runner, manifest_digest, overlay_sha256, wait_for, write_into_overlay,
)

pytestmark = [pytest.mark.k8s, pytest.mark.crash]


def crash_points(image: Path, work: Path, job_id: str) -> dict[str, int]:
    """1-based operation numbers of the three phases, from a dry run on a copy."""
    copy_dir, journal = work / "dry", work / "dry-journal"
    copy_dir.mkdir()
    journal.mkdir()
    copy = copy_dir / image.name
    shutil.copyfile(image, copy)
    io = CountingIO(None, keep_log=True)
    result = engine.sync(copy, job=job_id, journal_dir=str(journal), io=io)
    assert result.action == "reconciled"
    log = io.log
    record_open = next(i for i, (op, info) in enumerate(log) if op == "open" and str(info["path"]).startswith(str(journal)))
    journal_fd = next(info["fd"] for op, info in log[record_open:] if op == "pwrite")
    image_writes = [i for i, (op, info) in enumerate(log) if i > record_open and op == "pwrite" and info["fd"] != journal_fd]
    commit_point = next(i for i in image_writes if log[i][1]["offset"] == 0)
    committed_record = next(i for i, (op, info) in enumerate(log)
                            if i > commit_point and op == "pwrite" and info["fd"] == journal_fd)
    points = {"before-append": image_writes[0] + 1, "before-commit-point": commit_point + 1,
              "after-committed": committed_record + 3}  # past the record's fsync: GC is next
    reference = manifest_digest(copy)
    shutil.rmtree(copy_dir)
    shutil.rmtree(journal)
    return {**points, "reference": reference}  # type: ignore[dict-item]


def reconciles_counted() -> float:
    return sum(metrics.REGISTRY.get_sample_value("sifoverlay_operator_reconciles_total", {"result": r}) or 0.0
               for r in ("reconciled", "noop", "replayed", "replayed-and-reconciled", "error"))


@pytest.mark.parametrize("phase", ["before-append", "before-commit-point", "after-committed"])
def test_operator_killed_during_reconcile_resumes_and_reconciles_once(phase: str, site: Site, cluster: Cluster,
                                                                      vectors: Path) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("resumable")
    log_path = site.work / "operator-1.log"
    env = dict(os.environ)
    with open(log_path, "w") as log_file:
        first = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", OPERATOR_SCRIPT],
                                 env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        cluster.wait_phase("resumable", "Running")
        uid = cluster.get("resumable")["metadata"]["uid"]
        job_id = names.session_job_id(cluster.ns, "resumable", uid)
        pod = cluster.start_pod(cluster.wait_job("resumable-run"))
        write_into_overlay(image, "model.bin", os.urandom(20000), site.work)
        points = crash_points(image, site.work, job_id)
        # the crash point applies to the next operator process only: restart it armed
        first.send_signal(signal.SIGTERM)
        first.wait(WAIT)
        env["SIFOVERLAY_CRASH_AT"] = str(points[phase])
        with open(log_path, "a") as log_file:
            first = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
                                      OPERATOR_SCRIPT], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        cluster.pod_phase(pod, "Succeeded")
        cluster.finish_job("resumable-run", "Complete")
        assert first.wait(WAIT) == -signal.SIGKILL, log_path.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # killed mid-commit: status says Reconciling, the journal holds the unfinished commit
    status = cluster.status("resumable")
    assert status["phase"] == "Reconciling" and status["jobResult"] == "Succeeded"
    assert len(Journal(str(site.journal)).pending(str(image))) == 1
    assert [s.job_id for s in sessions.open_sessions(site.journal)] == [job_id]
    assert cluster.lease_holders() == [f"{cluster.ns}/resumable"]

    counted = reconciles_counted()
    with kopf_runner():
        done = cluster.wait_phase("resumable", "Succeeded")
        assert reconciles_counted() - counted == 1  # exactly one reconcile after the restart
    after = overlay_sha256(image)
    assert after != before
    assert done["overlayDigestBefore"] == before and done["overlayDigestAfter"] == after
    assert done["manifestDigest"] == manifest_digest(image) == points["reference"]
    assert cluster.condition("resumable", "Reconciled")["reason"] == "OverlayChanged"
    now = engine.status(image, verify=True, journal_dir=str(site.journal))
    assert (now.state, now.recorded_digest, now.actual_digest, now.journal_pending) == ("clean", after, after, 0)
    assert now.holder is None  # the killed operator's file lease was cleaned up
    assert sessions.open_sessions(site.journal) == []
    assert cluster.lease_holders() == []
    # a second pass over the same resource finds nothing to do
    assert engine.sync(image, journal_dir=str(site.journal)).action == "noop"
    wait_for("no stray processes", lambda: first.poll() is not None)


def test_workload_ends_while_the_operator_is_down(site: Site, cluster: Cluster, vectors: Path) -> None:
    """Nobody watches when the Job completes and its pod goes away; the restarted operator
    finds it by resuming (level-based), not by an event it never saw."""
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    with kopf_runner():
        cluster.create_overlayjob("unwatched")
        pod = cluster.start_pod(cluster.wait_job("unwatched-run"), finalizer=True)
        cluster.wait_phase("unwatched", "Running")
    write_into_overlay(image, "night.txt", b"ran overnight\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("unwatched-run", "Complete")
    cluster.delete_pod(pod)
    cluster.release_pod(pod)
    assert cluster.status("unwatched")["phase"] == "Running"
    counted = reconciles_counted()
    with kopf_runner():
        done = cluster.wait_phase("unwatched", "Succeeded")
        assert reconciles_counted() - counted == 1
    assert done["jobResult"] == "Succeeded"
    assert done["overlayDigestBefore"] == before and done["overlayDigestAfter"] == overlay_sha256(image) != before
    assert cluster.lease_holders() == [] and sessions.open_sessions(site.journal) == []


def test_restart_after_the_job_was_created_but_before_the_status(site: Site, cluster: Cluster, vectors: Path) -> None:
    """The state a crash leaves between `create Job` and `patch status`: Lease taken,
    session open, child Job present, status empty. The restarted operator adopts all three."""
    import datetime as dt

    from sifoverlay.k8s import builders
    from sifoverlay.k8s.config import from_env

    image = site.make_image(vectors)
    body = cluster.create_overlayjob("halfway")
    uid = body["metadata"]["uid"]
    config = from_env()
    ref = builders.image_ref(body["spec"], cluster.ns, name="halfway")
    cluster.kube.coordination.create_namespaced_lease(cluster.ns, builders.lease(
        ref, namespace=cluster.ns, holder_namespace=cluster.ns, holder_name="halfway", holder_uid=uid,
        now=dt.datetime.now(dt.UTC), duration_seconds=3600))
    job_id = names.session_job_id(cluster.ns, "halfway", uid)
    sessions.start(site.journal, job_id, image, mode="rw", host="crashed-operator", uid=0, source="k8s")
    cluster.kube.batch.create_namespaced_job(cluster.ns, builders.workload_job(body, policy=config.pod_policy))
    created = cluster.job("halfway-run").metadata.uid
    with kopf_runner():
        running = cluster.wait_phase("halfway", "Running")
        assert running["jobName"] == "halfway-run" and cluster.job("halfway-run").metadata.uid == created
        assert cluster.lease_holders() == [f"{cluster.ns}/halfway"]
        assert [s.job_id for s in sessions.open_sessions(site.journal)] == [job_id]
        pod = cluster.start_pod(cluster.job("halfway-run"))
        cluster.pod_phase(pod, "Succeeded")
        cluster.finish_job("halfway-run", "Complete")
        cluster.wait_phase("halfway", "Succeeded")
    assert sessions.open_sessions(site.journal) == [] and cluster.lease_holders() == []
