"""An image on a volume the operator does not mount (a PVC in the user's namespace) is
reconciled by a short reconcile Job. The test plays the kubelet for that Job by running
the Job's own container command for real (/bin/sh, the sifoverlay CLI, the engine) on the
local directory standing in for the PVC, and reports its termination message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.k8s import well_known as wk
from tests.k8s.conftest import Cluster, Site, overlay_sha256, wait_for, write_into_overlay

pytestmark = pytest.mark.k8s


def run_like_kubelet(cluster: Cluster, job: object, volume: Path, work: Path) -> str:
    """Run the reconcile container's command with the volume mounted at `volume`, return
    what it wrote to its termination-log."""
    container = job.spec.template.spec.containers[0]  # type: ignore[attr-defined]
    assert container.name == wk.RECONCILE_CONTAINER and container.termination_message_policy == "FallbackToLogsOnError"
    log = work / "termination-log"
    argv = [a.replace(wk.IMAGE_MOUNT_PATH, str(volume)).replace("/dev/termination-log", str(log))
            for a in container.command]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.update({e.name: e.value.replace(wk.IMAGE_MOUNT_PATH, str(volume)) for e in container.env})
    result = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr
    return log.read_text()


def test_image_on_an_unmounted_volume_is_reconciled_by_a_reconcile_job(site: Site, cluster: Cluster, vectors: Path,
                                                                       operator: object) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("remote", image={"persistentVolumeClaim": {"claimName": "data"}, "path": "team/app.sif"})
    running = cluster.wait_phase("remote", "Running")
    assert running["imageIdentity"] == f"pvc:{cluster.ns}/data:team/app.sif"
    assert "overlayDigestBefore" not in running  # the operator cannot read the image
    pod = cluster.start_pod(cluster.wait_job("remote-run"))
    write_into_overlay(image, "out.txt", b"from a PVC\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("remote-run", "Complete")
    job = cluster.wait_job("remote-reconcile")
    wait_for("ReconcileJobRunning", lambda: cluster.condition("remote", "Reconciling").get("reason") == "ReconcileJobRunning")
    assert job.spec.template.spec.volumes[0].persistent_volume_claim.claim_name == "data"
    message = run_like_kubelet(cluster, job, site.volume, site.work)
    reconcile_pod = cluster.start_pod(job)
    cluster.pod_phase(reconcile_pod, "Succeeded", containerStatuses=[{
        "name": wk.RECONCILE_CONTAINER, "image": job.spec.template.spec.containers[0].image, "imageID": "",
        "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}}}])
    cluster.finish_job("remote-reconcile", "Complete")
    done = cluster.wait_phase("remote", "Succeeded")
    after = overlay_sha256(image)
    assert after != before and done["overlayDigestAfter"] == after and done["reconcileAction"] == "reconciled"
    assert cluster.condition("remote", "Reconciled")["reason"] == "OverlayChanged"
    assert cluster.lease_holders() == []
    journal = site.volume / ".sifoverlay-journal"  # the Job's journal lives on the image's volume
    now = engine.status(image, verify=True, journal_dir=str(journal))
    assert (now.state, now.recorded_digest, now.actual_digest, now.journal_pending) == ("clean", after, after, 0)


def test_failed_reconcile_job_is_retried_with_a_fresh_job(site: Site, cluster: Cluster, vectors: Path,
                                                         operator: object) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("remote2", image={"persistentVolumeClaim": {"claimName": "data"}, "path": "team/app.sif"})
    pod = cluster.start_pod(cluster.wait_job("remote2-run"))
    cluster.pod_phase(pod, "Failed")
    cluster.finish_job("remote2-run", "Failed")
    first = cluster.wait_job("remote2-reconcile")
    cluster.finish_job("remote2-reconcile", "Failed", "image busy")
    cond = wait_for("ReconcileError", lambda: (c := cluster.condition("remote2", "Reconciling")).get("reason") == "ReconcileError" and c)
    assert "reconcile Job failed" in cond["message"] and "image busy" in cond["message"]
    assert cluster.status("remote2")["phase"] == "Reconciling"
    assert cluster.lease_holders() == [f"{cluster.ns}/remote2"]  # still held: not reconciled yet
    retry = wait_for("a new reconcile Job", lambda: (j := cluster.job("remote2-reconcile")) is not None
                     and j.metadata.uid != first.metadata.uid and j)
    assert not (retry.status and retry.status.conditions)  # fresh: the failed one was deleted
