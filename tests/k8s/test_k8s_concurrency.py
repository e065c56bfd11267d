"""The operator against the strict API server: two replicas, Lease takeover races and
status writes that conflict.

A "replica" is a Controller with its own API client and its own lock table, as a second
operator process would have (two pods during a rollout, or a second Deployment by
mistake): nothing in-process serialises them, only the API server's optimistic
concurrency (409 on a stale resourceVersion) and delete preconditions. Writes of status
are retried or redone (level-based); Lease takeovers are guarded by uid+resourceVersion.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from sifoverlay import engine
from sifoverlay.engine import sessions
from sifoverlay.errors import ImageBusy
from sifoverlay.k8s import builders, metrics, names
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.config import from_env
from sifoverlay.k8s.controller import Controller
from sifoverlay.k8s.kubeapi import Conflict, KubeApi
from tests.k8s.conftest import Cluster, Site, overlay_sha256, wait_for, write_into_overlay

pytestmark = pytest.mark.k8s
T = Any


class HookedApi(KubeApi):
    """A replica's client that runs `hooks[name]` once just before that call."""

    def __init__(self) -> None:
        super().__init__(kubernetes.client.ApiClient())
        self.hooks: dict[str, list[Callable[[], None]]] = {}

    def _hook(self, name: str) -> None:
        pending = self.hooks.get(name) or []
        if pending:
            pending.pop(0)()

    def patch_status(self, namespace: str, name: str, status: Any, *, resource_version: str | None = None) -> Any:
        self._hook("patch_status")
        return super().patch_status(namespace, name, status, resource_version=resource_version)

    def delete_lease(self, namespace: str, name: str, *, uid: str | None = None,
                     resource_version: str | None = None) -> bool:
        self._hook("delete_lease")
        return super().delete_lease(namespace, name, uid=uid, resource_version=resource_version)


def replica(api: KubeApi | None = None) -> Controller:
    return Controller(api or HookedApi(), from_env())


def conflicts(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("sifoverlay_operator_status_conflicts_total", {"outcome": outcome}) or 0.0


def until_done(step: Callable[[], None], tries: int = 50) -> int:
    """What kopf does with a TemporaryError: run the step again. Returns the retries."""
    for attempt in range(tries):
        try:
            step()
            return attempt
        except (Conflict, ImageBusy):
            time.sleep(0.05)
    raise AssertionError("step never settled")


def race(*steps: Callable[[], None]) -> None:
    barrier = threading.Barrier(len(steps))
    errors: list[BaseException] = []

    def run(step: Callable[[], None]) -> None:
        barrier.wait()
        try:
            until_done(step)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_a_status_write_after_a_metadata_change_is_retried_at_the_new_version(site: Site, cluster: Cluster,
                                                                              vectors: Path) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("meta")
    api = HookedApi()
    # between the controller's read and its write, kopf (say) writes an annotation
    api.hooks["patch_status"] = [lambda: cluster.kube.custom.patch_namespaced_custom_object(
        wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "meta", {"metadata": {"annotations": {"kopf.example/progress": "x"}}})]
    before = conflicts("retried")
    ctl = replica(api)
    ctl.start(cluster.get("meta"))
    assert conflicts("retried") == before + 1  # one 409, then the same patch at the new version
    assert cluster.status("meta")["phase"] == "Running"
    assert ctl.lock_table_size() == 0  # pruned once nobody holds the entry


def test_a_status_write_after_another_replicas_status_write_is_redone(site: Site, cluster: Cluster,
                                                                      vectors: Path) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("redo")
    other = builders.condition(wk.COND_DRIFT_DETECTED, False, wk.REASON_IN_SYNC, "written by the other replica",
                               generation=1, now=builders.dt.datetime.now(builders.dt.UTC))
    api = HookedApi()
    api.hooks["patch_status"] = [lambda: cluster.kube.custom.patch_namespaced_custom_object_status(
        wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "redo", {"status": {"conditions": [other]}})]
    ctl = replica(api)
    before = conflicts("redo")
    with pytest.raises(Conflict):
        ctl.start(cluster.get("redo"))  # computed from a status that is gone: not written over it
    assert conflicts("redo") == before + 1
    assert cluster.status("redo")["conditions"] == [other]
    ctl.start(cluster.get("redo"))  # kopf's retry: the step again, on the fresh object
    status = cluster.status("redo")
    assert status["phase"] == "Running"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["DriftDetected"]["message"] == "written by the other replica"  # no lost update
    assert by_type["LeaseAcquired"]["status"] == by_type["JobRunning"]["status"] == "True"
    assert len(cluster.kube.batch.list_namespaced_job(cluster.ns).items) == 1


def test_two_replicas_race_through_a_whole_lifecycle(site: Site, cluster: Cluster, vectors: Path) -> None:
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("twin")
    one, two = replica(), replica()
    race(lambda: one.start(cluster.get("twin")), lambda: two.start(cluster.get("twin")))
    running = cluster.status("twin")
    assert running["phase"] == "Running" and running["leaseHolder"] == f"{cluster.ns}/twin"
    assert [j.metadata.name for j in cluster.kube.batch.list_namespaced_job(cluster.ns).items] == ["twin-run"]
    assert cluster.lease_holders() == [f"{cluster.ns}/twin"]
    assert len(sessions.open_sessions(site.journal)) == 1
    pod = cluster.start_pod(cluster.job("twin-run"))
    write_into_overlay(image, "twin.txt", b"both replicas saw this\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("twin-run", "Complete")
    race(lambda: one.workload_ended(cluster.ns, "twin", wk.RESULT_SUCCEEDED, "done"),
         lambda: two.workload_ended(cluster.ns, "twin", wk.RESULT_SUCCEEDED, "done"),
         lambda: two.recheck(cluster.get("twin") or {"metadata": {"namespace": cluster.ns, "name": "twin"}}))
    done = cluster.status("twin")
    after = overlay_sha256(image)
    assert after != before
    assert (done["phase"], done["overlayDigestBefore"], done["overlayDigestAfter"]) == ("Succeeded", before, after)
    by_type = {c["type"]: c for c in done["conditions"]}
    assert (by_type["Complete"]["status"], by_type["Reconciled"]["reason"]) == ("True", "OverlayChanged")
    now = engine.status(image, verify=True, journal_dir=str(site.journal))
    assert (now.state, now.recorded_digest, now.actual_digest) == ("clean", after, after)
    assert cluster.lease_holders() == [] and sessions.open_sessions(site.journal) == []
    assert one.lock_table_size() == two.lock_table_size() == 0


def finished_holder(cluster: Cluster, name: str) -> dict[str, Any]:
    """An OverlayJob that holds the image's Lease and has finished: its Lease is stale."""
    body = cluster.create_overlayjob(name)
    cluster.kube.custom.patch_namespaced_custom_object_status(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, name,
                                                              {"status": {"phase": "Succeeded"}})
    return body


def test_lease_takeover_race_has_exactly_one_winner(site: Site, cluster: Cluster) -> None:
    ref = builders.image_ref({"image": {"hostPath": {"path": "/data/images"}, "path": "team/app.sif"}}, cluster.ns)
    stale = finished_holder(cluster, "old")
    now = builders.dt.datetime.now(builders.dt.UTC)
    for round_ in range(4):
        holder = stale if round_ == 0 else cluster.get(winner)
        contenders = [cluster.create_overlayjob(f"r{round_}-{i}") for i in range(3)]
        if round_ == 0:
            cluster.kube.coordination.create_namespaced_lease(site.namespace, builders.lease(
                ref, namespace=site.namespace, holder_namespace=cluster.ns, holder_name="old",
                holder_uid=holder["metadata"]["uid"], now=now, duration_seconds=60))
        got: dict[str, str | None] = {}
        replicas = [replica() for _ in contenders]

        def take(ctl: Controller, body: dict[str, Any]) -> Callable[[], None]:
            return lambda: got.__setitem__(body["metadata"]["name"], ctl.leases.acquire(ref, body, now=now))

        race(*(take(c, b) for c, b in zip(replicas, contenders)))
        winners = [n for n, h in got.items() if h is None]
        assert len(winners) == 1, got
        winner = winners[0]
        assert all(h == f"{cluster.ns}/{winner}" for n, h in got.items() if n != winner), got
        assert cluster.lease_holders() == [f"{cluster.ns}/{winner}"]
        cluster.kube.custom.patch_namespaced_custom_object_status(  # the winner finishes: next round takes over
            wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, winner, {"status": {"phase": "Failed"}})


def test_a_takeover_never_deletes_the_lease_another_replica_just_took(site: Site, cluster: Cluster) -> None:
    """Replica 1 judges the Lease stale; before its delete lands, replica 2 takes it over
    (delete + create: a new uid). Replica 1's delete carries the stale Lease's uid and
    resourceVersion, so the server refuses it: replica 2 keeps the image."""
    ref = builders.image_ref({"image": {"hostPath": {"path": "/data/images"}, "path": "team/app.sif"}}, cluster.ns)
    stale = finished_holder(cluster, "old")
    now = builders.dt.datetime.now(builders.dt.UTC)
    cluster.kube.coordination.create_namespaced_lease(site.namespace, builders.lease(
        ref, namespace=site.namespace, holder_namespace=cluster.ns, holder_name="old",
        holder_uid=stale["metadata"]["uid"], now=now, duration_seconds=60))
    first, second = cluster.create_overlayjob("first"), cluster.create_overlayjob("second")
    api = HookedApi()
    slow, fast = replica(api), replica()
    api.hooks["delete_lease"] = [lambda: fast.leases.acquire(ref, second, now=now)]
    assert slow.leases.acquire(ref, first, now=now) == f"{cluster.ns}/second"
    lease = cluster.kube.coordination.read_namespaced_lease(names.lease_name(ref.identity), site.namespace)
    assert (lease.spec.holder_identity, lease.metadata.annotations[wk.ANNOTATION_HOLDER_UID]) == (
        f"{cluster.ns}/second", second["metadata"]["uid"])


def test_a_second_replica_rechecking_beside_the_running_operator(site: Site, cluster: Cluster, vectors: Path,
                                                                 operator: object) -> None:
    """The real operator (kopf) runs the lifecycle; a second replica re-checks the same
    resource every 50 ms all along. Whoever gets there first does each step; the result
    is the one a single operator gives."""
    image = site.make_image(vectors)
    before = overlay_sha256(image)
    cluster.create_overlayjob("shared")
    second, stop = replica(), threading.Event()
    seen: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            body = cluster.get("shared")
            if body is not None:
                try:
                    second.recheck(body)
                except (Conflict, ImageBusy):
                    seen.append("retry")
            time.sleep(0.05)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        pod = cluster.start_pod(cluster.wait_job("shared-run"))
        write_into_overlay(image, "shared.txt", b"two operators\n", site.work)
        cluster.pod_phase(pod, "Succeeded")
        cluster.finish_job("shared-run", "Complete")
        done = cluster.wait_phase("shared", "Succeeded")
    finally:
        stop.set()
        thread.join(30)
    after = overlay_sha256(image)
    assert (done["overlayDigestBefore"], done["overlayDigestAfter"]) == (before, after) and after != before
    assert wait_for("Complete", lambda: cluster.condition("shared", "Complete").get("status") == "True")
    assert cluster.lease_holders() == [] and sessions.open_sessions(site.journal) == []
    assert [j.metadata.name for j in cluster.kube.batch.list_namespaced_job(cluster.ns).items] == ["shared-run"]
    assert second.lock_table_size() == 0
