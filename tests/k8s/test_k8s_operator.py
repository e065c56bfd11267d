"""The real operator (KopfRunner) against kmock over HTTP, with real OCI-SIF images.

The test plays the Job controller and kubelet (see conftest.Cluster) and the workload
(it writes into the overlay's ext3 with debugfs). The operator reconciles for real via
the engine; every digest in the status is checked against sha256 of the ext3 bytes
computed here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine import sessions
from sifoverlay.k8s import names
from tests.conftest import require_tool
from tests.k8s.conftest import WAIT, Cluster, Site, manifest_digest, overlay_sha256, wait_for, write_into_overlay

pytestmark = pytest.mark.k8s


def assert_reconciled(cluster: Cluster, site: Site, name: str, image: Path, before: str, *, phase: str) -> dict:
    status = cluster.wait_phase(name, phase)
    after = overlay_sha256(image)
    assert after != before
    assert status["overlayDigestBefore"] == before
    assert status["overlayDigestAfter"] == after
    assert status["manifestDigest"] == manifest_digest(image)
    assert status["reconcileAction"] == "reconciled"
    assert status["lastReconcileTime"].endswith("Z")
    assert "leaseHolder" not in status
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Reconciled"]["status"] == "True" and by_type["Reconciled"]["reason"] == "OverlayChanged"
    assert after in by_type["Reconciled"]["message"]
    assert by_type["Reconciling"]["status"] == "False"
    assert by_type["LeaseAcquired"]["status"] == "False" and by_type["LeaseAcquired"]["reason"] == "Released"
    # the image itself agrees: the manifest records the overlay's real digest, nothing pending
    now = engine.status(image, verify=True, journal_dir=str(site.journal))
    assert (now.state, now.recorded_digest, now.actual_digest, now.journal_pending) == ("clean", after, after, 0)
    assert cluster.lease_holders() == []
    assert sessions.open_sessions(site.journal) == []
    return status


def test_success_reconciles_the_overlay_the_workload_changed(site: Site, cluster: Cluster, vectors: Path, operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("train")
    running = cluster.wait_phase("train", "Running")
    assert running["jobName"] == "train-run" and running["leaseHolder"] == f"{cluster.ns}/train"
    assert running["overlayDigestBefore"] == before
    assert cluster.lease_holders() == [f"{cluster.ns}/train"]
    [session] = sessions.open_sessions(site.journal)
    assert (session.job_id, session.image, session.source) == (
        names.session_job_id(cluster.ns, "train", cluster.get("train")["metadata"]["uid"]), str(image), "k8s")
    job = cluster.wait_job("train-run")
    uid = cluster.get("train")["metadata"]["uid"]
    assert job.spec.template.spec.containers[0].command == [
        "sifoverlay", "exec", "--allow-root-options", "--writable", "--mount", "fuse",
        "--job-id", names.session_job_id(cluster.ns, "train", uid),
        "--journal-dir", "/sifoverlay/image/.sifoverlay-journal", "--user=65534:65534", "/sifoverlay/image/team/app.sif",
        "--", "sh", "-c", "echo hi > /out"]
    assert job.spec.template.spec.containers[0].image == "ghcr.io/sifoverlay/operator:0.1.0"  # the runner, never the user's
    assert job.metadata.owner_references[0].name == "train"
    pod = cluster.start_pod(job)
    wait_for("Mounted", lambda: cluster.condition("train", "Mounted").get("status") == "True")
    write_into_overlay(image, "result.txt", b"trained weights\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("train-run", "Complete")
    status = assert_reconciled(cluster, site, "train", image, before, phase="Succeeded")
    assert status["jobResult"] == "Succeeded"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Failed"]["status"], by_type["Failed"]["reason"]) == ("False", "Succeeded")
    assert (by_type["Ready"]["status"], by_type["Complete"]["status"]) == ("True", "True")
    assert "Stalled" not in by_type
    events = wait_for("events", lambda: (e := [(ev.type, ev.reason) for ev in cluster.kube.core.list_namespaced_event(cluster.ns).items
                                               if ev.involved_object.name == "train"]) and len(e) >= 3 and e)
    assert {("Normal", "JobCreated"), ("Normal", "Succeeded"), ("Normal", "Reconciled")} <= set(events)


def test_job_failure_still_reconciles_and_marks_failed(site: Site, cluster: Cluster, vectors: Path, operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("crash")
    pod = cluster.start_pod(cluster.wait_job("crash-run"))
    write_into_overlay(image, "partial.txt", b"half written\n", site.work)
    cluster.pod_phase(pod, "Failed")
    cluster.finish_job("crash-run", "Failed", "exit code 3")
    status = assert_reconciled(cluster, site, "crash", image, before, phase="Failed")
    assert status["jobResult"] == "Failed"
    failed = cluster.condition("crash", "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "JobFailed")
    assert cluster.condition("crash", "JobRunning")["message"] == "Job failed: BackoffLimitExceeded exit code 3"


def test_pod_evicted_mid_run_is_reconciled_without_job_status(site: Site, cluster: Cluster, vectors: Path,
                                                             operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("evicted")
    pod = cluster.start_pod(cluster.wait_job("evicted-run"))
    write_into_overlay(image, "checkpoint.bin", b"\x00\x01" * 3000, site.work)
    # kubelet node-pressure eviction: the pod fails with reason Evicted; the Job is untouched
    cluster.pod_phase(pod, "Failed", reason="Evicted", message="The node was low on resource: memory.")
    status = assert_reconciled(cluster, site, "evicted", image, before, phase="Failed")
    assert status["jobResult"] == "Evicted"
    assert cluster.condition("evicted", "JobRunning")["reason"] == "PodEvicted"
    assert "low on resource: memory" in cluster.condition("evicted", "JobRunning")["message"]


def test_two_resources_on_one_image_second_waits_for_the_first(site: Site, cluster: Cluster, vectors: Path,
                                                              operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("first")
    cluster.wait_phase("first", "Running")
    cluster.create_overlayjob("second")
    waiting = cluster.wait_phase("second", "Waiting")
    assert waiting["leaseHolder"] == f"{cluster.ns}/first"
    held = cluster.condition("second", "LeaseAcquired")
    assert (held["status"], held["reason"]) == ("False", "HeldByOther")
    assert f"held by OverlayJob {cluster.ns}/first" in held["message"]
    assert cluster.job("second-run") is None
    pod = cluster.start_pod(cluster.wait_job("first-run"))
    write_into_overlay(image, "one.txt", b"first\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("first-run", "Complete")
    first = cluster.wait_phase("first", "Succeeded")
    # the second proceeds, and starts from the overlay the first left behind
    second = cluster.wait_phase("second", "Running")
    assert second["overlayDigestBefore"] == first["overlayDigestAfter"] == overlay_sha256(image) != before
    assert cluster.lease_holders() == [f"{cluster.ns}/second"]
    assert cluster.condition("second", "LeaseAcquired")["status"] == "True"
    pod2 = cluster.start_pod(cluster.wait_job("second-run"))
    mid = overlay_sha256(image)
    write_into_overlay(image, "two.txt", b"second\n", site.work)
    cluster.pod_phase(pod2, "Succeeded")
    cluster.finish_job("second-run", "Complete")
    assert_reconciled(cluster, site, "second", image, mid, phase="Succeeded")


def test_delete_while_running_waits_for_the_pod_then_reconciles_then_goes(site: Site, cluster: Cluster, vectors: Path,
                                                                        operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("doomed")
    job = cluster.wait_job("doomed-run")
    pod = cluster.start_pod(job, finalizer=True)
    wait_for("finalizer", lambda: "sifoverlay.dev/reconcile" in (cluster.get("doomed")["metadata"].get("finalizers") or []))
    write_into_overlay(image, "late.txt", b"still writing\n", site.work)
    cluster.kube.custom.delete_namespaced_custom_object("sifoverlay.dev", "v1alpha1", cluster.ns, "overlayjobs", "doomed")
    # the operator deletes the child Job and waits: the pod may still write
    wait_for("child Job deleted", lambda: cluster.job("doomed-run") is None)
    waiting = wait_for("waiting for pods", lambda: cluster.condition("doomed", "Reconciling").get("reason") == "WaitingForPods"
                       and cluster.condition("doomed", "Reconciling"))
    assert pod in waiting["message"]
    assert cluster.get("doomed") is not None
    assert engine.status(image, journal_dir=str(site.journal)).recorded_digest == before  # not reconciled yet
    cluster.delete_pod(pod)  # graceful: MODIFIED with deletionTimestamp first
    cluster.release_pod(pod)  # then the kubelet lets it go: DELETED
    wait_for("OverlayJob gone", lambda: cluster.get("doomed") is None)
    after = overlay_sha256(image)
    assert after != before
    now = engine.status(image, verify=True, journal_dir=str(site.journal))
    assert (now.state, now.recorded_digest, now.actual_digest) == ("clean", after, after)
    assert cluster.lease_holders() == []
    assert sessions.open_sessions(site.journal) == []


def test_delete_with_escape_hatch_skips_the_reconcile(site: Site, cluster: Cluster, vectors: Path, operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("stuck")
    cluster.start_pod(cluster.wait_job("stuck-run"))
    write_into_overlay(image, "x.txt", b"x\n", site.work)
    cluster.kube.custom.patch_namespaced_custom_object(
        "sifoverlay.dev", "v1alpha1", cluster.ns, "overlayjobs", "stuck",
        {"metadata": {"annotations": {"sifoverlay.dev/skip-reconcile-on-delete": "true"}}})
    cluster.kube.custom.delete_namespaced_custom_object("sifoverlay.dev", "v1alpha1", cluster.ns, "overlayjobs", "stuck")
    wait_for("OverlayJob gone", lambda: cluster.get("stuck") is None)
    assert cluster.lease_holders() == []
    # not reconciled: the manifest still names the old digest, and the session stays open
    # so that `sifoverlay recover` / the next reconcile finds it
    assert engine.status(image, journal_dir=str(site.journal)).recorded_digest == before
    assert [s.image for s in sessions.open_sessions(site.journal)] == [str(image)]


def test_bad_spec_is_rejected_by_the_schema_with_422(cluster: Cluster) -> None:
    import kubernetes

    with pytest.raises(kubernetes.client.ApiException) as err:
        cluster.create_overlayjob("bad", mode="rwx")
    assert err.value.status == 422
    assert "spec.mode: 'rwx' is not one of ['rw', 'ro']" in err.value.body
    with pytest.raises(kubernetes.client.ApiException) as err:
        cluster.create_overlayjob("bad2", image={"path": "a.sif"})
    assert err.value.status == 422 and "spec.image" in err.value.body
    assert cluster.get("bad") is None and cluster.get("bad2") is None


def test_spec_the_schema_cannot_judge_fails_permanently(site: Site, cluster: Cluster, operator: object) -> None:
    cluster.create_overlayjob("escape", relpath="../../etc/passwd")
    status = cluster.wait_phase("escape", "Failed")
    failed = cluster.condition("escape", "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.image.path '../../etc/passwd' must be a relative path" in failed["message"]
    assert cluster.job("escape-run") is None and cluster.lease_holders() == []
    assert "jobName" not in status


def test_not_an_oci_sif_fails_permanently_and_releases_the_lease(site: Site, cluster: Cluster, operator: object) -> None:
    (site.volume / "team").mkdir()
    (site.volume / "team" / "app.sif").write_bytes(b"not a SIF at all" * 100)
    cluster.create_overlayjob("junk")
    cluster.wait_phase("junk", "Failed")
    failed = cluster.condition("junk", "Failed")
    assert failed["reason"] == "InvalidImage"
    assert str(site.volume / "team" / "app.sif") in failed["message"]
    wait_for("Lease released", lambda: cluster.lease_holders() == [])
    assert cluster.job("junk-run") is None


def test_drift_timer_flags_an_overlay_changed_after_the_reconcile(site: Site, cluster: Cluster, vectors: Path,
                                                                  operator: object) -> None:
    image = site.make_image(vectors)
    cluster.create_overlayjob("drifty")
    pod = cluster.start_pod(cluster.wait_job("drifty-run"))
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("drifty-run", "Complete")
    done = cluster.wait_phase("drifty", "Succeeded")
    assert done["reconcileAction"] == "noop"
    assert cluster.condition("drifty", "Reconciled")["reason"] == "Unchanged"
    wait_for("in sync", lambda: cluster.condition("drifty", "DriftDetected").get("reason") == "InSync")
    write_into_overlay(image, "sneaky.txt", b"written outside any job\n", site.work)  # nobody reconciles this
    drift = wait_for("drift", lambda: (c := cluster.condition("drifty", "DriftDetected")).get("status") == "True" and c,
                     timeout=WAIT)
    assert drift["reason"] == "OverlayDrift"
    assert done["overlayDigestAfter"] in drift["message"]


@pytest.mark.parametrize("disrupted, result, reason", [(False, "PodDeleted", "PodDeleted"),
                                                       (True, "Evicted", "PodEvicted")])
def test_pod_deleted_mid_run_waits_for_it_to_go_then_reconciles(disrupted: bool, result: str, reason: str, site: Site,
                                                                 cluster: Cluster, vectors: Path, operator: object) -> None:
    """kubectl delete pod (or a drain through the Eviction API, which marks the pod with a
    DisruptionTarget condition first): terminating is not gone, the writer may still run."""
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    name = "drained" if disrupted else "killed"
    cluster.create_overlayjob(name)
    pod = cluster.start_pod(cluster.wait_job(f"{name}-run"), finalizer=True)
    wait_for("Mounted", lambda: cluster.condition(name, "Mounted").get("status") == "True")
    write_into_overlay(image, "w.txt", b"w\n", site.work)
    if disrupted:
        cluster.kube.core.patch_namespaced_pod_status(pod, cluster.ns, {"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]}})
    cluster.delete_pod(pod)  # MODIFIED with deletionTimestamp: still terminating
    time.sleep(1.5)  # longer than the re-check interval: the timer had its chance to act too early
    assert cluster.status(name)["phase"] == "Running"
    assert engine.status(image, journal_dir=str(site.journal)).recorded_digest == before
    cluster.release_pod(pod)  # DELETED
    status = assert_reconciled(cluster, site, name, image, before, phase="Failed")
    assert status["jobResult"] == result
    assert cluster.condition(name, "JobRunning")["reason"] == reason
    assert cluster.condition(name, "Mounted")["reason"] == "Unmounted"


def test_seal_on_success_freezes_the_overlay_after_the_reconcile(site: Site, cluster: Cluster, vectors: Path,
                                                                operator: object) -> None:
    from sifoverlay.ocisif import open_image

    require_tool("mksquashfs")
    image = site.make_image(vectors)
    cluster.create_overlayjob("sealed", policy={"sealOnSuccess": True})
    pod = cluster.start_pod(cluster.wait_job("sealed-run"))
    write_into_overlay(image, "final.txt", b"final\n", site.work)
    reconciled = overlay_sha256(image)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("sealed-run", "Complete")
    status = cluster.wait_phase("sealed", "Succeeded")
    assert status["sealed"] is True and status["overlayDigestAfter"] == reconciled
    with open_image(image) as img:
        assert img.overlay is None  # the ext3 layer became a read-only squashfs layer
        assert str(img.manifest.digest) == status["manifestDigest"]
    time.sleep(1.5)  # the drift timer ran at least once and must leave a sealed image alone
    assert cluster.condition("sealed", "DriftDetected") == {}
