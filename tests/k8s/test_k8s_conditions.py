"""Conditions for tools that wait on them, Events for every phase change, and
ttlSecondsAfterFinished, against the real operator.

`kubectl wait --for=condition=Complete ovj/NAME` is checked two ways: with the real
kubectl against the test API server (when kubectl is installed), and with the rule
kubectl applies (the condition's status is "True" and, where it says, its
observedGeneration is the object's generation), re-implemented here so the check also
runs where no kubectl is.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.conftest import Cluster, Site, wait_for, write_into_overlay

pytestmark = pytest.mark.k8s
SUMMARY = ("Ready", "Complete", "Failed", "Reconciled")


def kubectl_wait_met(obj: dict[str, Any], ctype: str, value: str = "True") -> bool:
    """kubectl wait --for=condition=TYPE[=VALUE]: met when the condition has that status
    and was observed at the current generation (status.observedGeneration, or the
    condition's own)."""
    generation = int(obj["metadata"].get("generation") or 0)
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") != ctype:
            continue
        observed = cond.get("observedGeneration", status.get("observedGeneration"))
        if observed is not None and int(observed) < generation:
            return False
        return str(cond.get("status")).lower() == value.lower()
    return False


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus' generic rules for a custom resource (cli-utils pkg/kstatus): deletion ->
    Terminating; an old observedGeneration -> InProgress; then the conditions in their
    order: the first Reconciling=True -> InProgress, the first Stalled=True -> Failed;
    otherwise Current (Ready is not read)."""
    status = obj.get("status") or {}
    if obj["metadata"].get("deletionTimestamp"):
        return "Terminating"
    if int(status.get("observedGeneration", -1)) != int(obj["metadata"].get("generation", 0)):
        return "InProgress"
    for cond in status.get("conditions") or []:
        if cond["type"] == "Reconciling" and cond["status"] == "True":
            return "InProgress"
        if cond["type"] == "Stalled" and cond["status"] == "True":
            return "Failed"
    return "Current"


def phase_events(cluster: Cluster, name: str) -> list[tuple[str, str]]:
    events = [e for e in cluster.kube.core.list_namespaced_event(cluster.ns).items
              if e.involved_object.name == name and e.reason == "PhaseChanged"]
    events.sort(key=lambda e: (e.first_timestamp or e.event_time or e.metadata.creation_timestamp, e.metadata.name))
    return [(e.type, e.message) for e in events]


def run_to_the_end(cluster: Cluster, site: Site, name: str, condition: str, relpath: str = "team/app.sif") -> None:
    pod = cluster.start_pod(cluster.wait_job(f"{name}-run"))
    write_into_overlay(site.volume / relpath, f"{name}.txt", b"x\n", site.work)
    cluster.pod_phase(pod, "Succeeded" if condition == "Complete" else "Failed")
    cluster.finish_job(f"{name}-run", condition, "exit code 1" if condition == "Failed" else "")


def test_ttl_seconds_after_finished_deletes_the_overlayjob_and_its_job(site: Site, cluster: Cluster, vectors: Path,
                                                                        operator: object) -> None:
    site.make_image(vectors)
    site.make_image(vectors, "team/other.sif")
    cluster.create_overlayjob("short", ttlSecondsAfterFinished=2)
    cluster.create_overlayjob("kept", relpath="team/other.sif", policy={"deleteJobAfterSeconds": 1})
    run_to_the_end(cluster, site, "short", "Complete")
    run_to_the_end(cluster, site, "kept", "Complete", "team/other.sif")
    finished = cluster.wait_phase("short", "Succeeded")
    assert cluster.get("short") is not None and finished["lastReconcileTime"]
    # the operator deletes it (uid precondition) and its Job; its finalizer's handler
    # (terminal: nothing to reconcile) lets it go
    wait_for("OverlayJob deleted after its TTL", lambda: cluster.get("short") is None)
    wait_for("its Job deleted too", lambda: cluster.job("short-run") is None)
    ttl = [e for e in cluster.kube.core.list_namespaced_event(cluster.ns).items if e.reason == "TTLExpired"]
    assert [e.message for e in ttl] == ["deleted 2s after it finished (ttlSecondsAfterFinished)"]
    # the deprecated alias deletes only the child Job; the OverlayJob stays
    cluster.wait_phase("kept", "Succeeded")
    wait_for("child Job deleted", lambda: cluster.job("kept-run") is None)
    assert cluster.get("kept") is not None


def test_a_deleted_resource_is_not_held_for_a_minute_by_a_timer_tick_in_flight() -> None:
    """The cause of ttlSecondsAfterFinished deletions that stalled: kopf keeps the finalizer
    until the resource's timers have stopped; a timer tick in flight (a sync handler in a
    thread, often the re-check that issued the delete) does not stop within kopf's
    "instant exit", and by default kopf looks again only after 60 s."""
    import kopf

    from sifoverlay.k8s.handlers import configure

    defaults, settings = kopf.OperatorSettings(), kopf.OperatorSettings()
    configure(settings)
    assert defaults.background.cancellation_polling == 60
    assert settings.background.cancellation_polling == 1.0 and settings.background.instant_exit_timeout == 0.2


def test_summary_conditions_follow_the_phase_and_kubectl_wait_sees_complete(site: Site, cluster: Cluster,
                                                                             vectors: Path, operator: object) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("waitme")
    running = cluster.wait_phase("waitme", "Running")
    body = cluster.get("waitme")
    by_type = {c["type"]: c for c in running["conditions"]}
    assert [(by_type[t]["status"], by_type[t]["reason"]) for t in SUMMARY] == [("False", "Running")] * 4
    assert all(c["observedGeneration"] == body["metadata"]["generation"] == 1 for c in running["conditions"])
    assert running["observedGeneration"] == 1
    assert not kubectl_wait_met(body, "Complete") and kstatus(body) == "InProgress"
    assert (by_type["Reconciling"]["status"], by_type["Reconciling"]["reason"]) == ("True", "Running")
    run_to_the_end(cluster, site, "waitme", "Complete")
    done = wait_for("Complete", lambda: kubectl_wait_met(b := cluster.get("waitme"), "Complete") and b)
    assert done["status"]["phase"] == "Succeeded" and kstatus(done) == "Current"
    by_type = {c["type"]: c for c in done["status"]["conditions"]}
    assert [(by_type[t]["status"], by_type[t]["reason"]) for t in SUMMARY] == [
        ("True", "Succeeded"), ("True", "Succeeded"), ("False", "Succeeded"), ("True", "OverlayChanged")]
    assert "Stalled" not in by_type and kubectl_wait_met(done, "Failed", "False") and kubectl_wait_met(done, "Reconciled")
    kubectl = shutil.which("kubectl")
    if kubectl:  # the real thing, once the condition holds (a long kubectl watch upsets kmock's watch streams)
        waiter = subprocess.run([kubectl, "--kubeconfig", str(cluster.kube.kubeconfig), "-n", cluster.ns, "wait",
                                 "--for=condition=Complete", "ovj/waitme", "--timeout=60s"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90)
        out = waiter.stdout
        assert waiter.returncode == 0, out
        # (kubectl also prints kmock quirks to stderr: a short-name warning and watch
        # serializer errors, after which it falls back to re-listing; the verdict is the same)
        assert out.strip().splitlines()[-1] == "overlayjob.sifoverlay.dev/waitme condition met", out
    else:
        print("kubectl not installed: only the re-implemented kubectl-wait rule is checked")
    events = wait_for("phase events", lambda: (e := phase_events(cluster, "waitme")) and len(e) >= 3 and e)
    assert sorted(events) == [("Normal", "phase Pending -> Running"), ("Normal", "phase Reconciling -> Succeeded"),
                              ("Normal", "phase Running -> Reconciling")]  # one per change, none twice


def test_failed_workload_is_failed_and_stalled_for_kstatus(site: Site, cluster: Cluster, vectors: Path,
                                                           operator: object) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("broken")
    run_to_the_end(cluster, site, "broken", "Failed")
    done = wait_for("Failed", lambda: kubectl_wait_met(b := cluster.get("broken"), "Failed") and b)
    by_type = {c["type"]: c for c in done["status"]["conditions"]}
    assert (by_type["Failed"]["reason"], by_type["Stalled"]["reason"]) == ("JobFailed", "JobFailed")
    assert not kubectl_wait_met(done, "Complete") and kstatus(done) == "Failed"
    assert by_type["Reconciled"]["status"] == "True"  # failed workloads are still reconciled
    events = wait_for("phase events", lambda: (e := phase_events(cluster, "broken")) and len(e) >= 3 and e)
    assert sorted(events) == [("Normal", "phase Pending -> Running"), ("Normal", "phase Running -> Reconciling"),
                              ("Warning", "phase Reconciling -> Failed")]


def test_a_refused_resource_goes_straight_to_failed_with_an_event(site: Site, cluster: Cluster, operator: object) -> None:
    cluster.create_overlayjob("nope", image={"hostPath": {"path": "/srv"}, "path": "a.sif"})
    refused = wait_for("Failed", lambda: kubectl_wait_met(b := cluster.get("nope"), "Failed") and b)
    by_type = {c["type"]: c for c in refused["status"]["conditions"]}
    assert (by_type["Reconciled"]["status"], by_type["Reconciled"]["reason"]) == ("False", "Failed")
    assert "Reconciling" not in by_type and kstatus(refused) == "Failed"
    events = wait_for("phase event", lambda: phase_events(cluster, "nope"))
    assert events == [("Warning", "phase Pending -> Failed")]
