"""The test API server (tests/k8s/kmock_server.py) enforces what a real one does for the
operator's writes: optimistic concurrency, delete preconditions, metadata.generation.
These tests talk to it with the official client, as the operator does; if the server
were kinder, the operator's concurrency tests (test_k8s_concurrency.py) would prove
nothing."""

from __future__ import annotations

import threading
from typing import Any

import kubernetes
import pytest

from sifoverlay.k8s import well_known as wk
from tests.k8s.conftest import Cluster

pytestmark = pytest.mark.k8s
WIDGETS = {"group": "semantics.sifoverlay.dev", "version": "v1", "plural": "widgets"}


def rv(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["resourceVersion"])


def status_of(exc: pytest.ExceptionInfo[kubernetes.client.ApiException]) -> tuple[int, str]:
    import json

    body = json.loads(exc.value.body)
    return exc.value.status, body["reason"]


def test_stale_patches_are_409_and_unconditional_ones_pass(cluster: Cluster) -> None:
    custom = cluster.kube.custom
    created = cluster.create_overlayjob("occ")
    first = rv(created)
    labelled = custom.patch_namespaced_custom_object(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "occ",
                                                     {"metadata": {"labels": {"a": "1"}, "resourceVersion": first}})
    assert int(rv(labelled)) > int(first)
    # the same write again, at the version it read: someone (itself) wrote since -> 409
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.patch_namespaced_custom_object(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "occ",
                                              {"metadata": {"labels": {"a": "2"}, "resourceVersion": first}})
    assert status_of(err) == (409, "Conflict")
    assert "the object has been modified" in err.value.body
    # the status subresource too
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.patch_namespaced_custom_object_status(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "occ",
                                                     {"metadata": {"resourceVersion": first}, "status": {"phase": "Failed"}})
    assert status_of(err) == (409, "Conflict")
    assert (cluster.get("occ") or {}).get("status", {}).get("phase") is None  # nothing written
    # a merge patch without a resourceVersion is unconditional (last writer wins), as on a real server
    custom.patch_namespaced_custom_object(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "occ", {"metadata": {"labels": {"a": "3"}}})
    assert cluster.get("occ")["metadata"]["labels"]["a"] == "3"


def test_two_writers_at_one_version_one_wins(cluster: Cluster) -> None:
    """The check and the write happen under one lock: of N concurrent writers that read
    the same version, exactly one succeeds, however the requests interleave."""
    custom = cluster.kube.custom
    version = rv(cluster.create_overlayjob("race"))
    barrier, results = threading.Barrier(6), []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            custom.patch_namespaced_custom_object_status(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "race", {
                "metadata": {"resourceVersion": version}, "status": {"leaseHolder": f"writer-{i}"}})
            results.append(("ok", i))
        except kubernetes.client.ApiException as exc:
            results.append((str(exc.status), i))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for r, i in results if r == "ok"]
    assert len(winners) == 1 and sorted(r for r, _ in results) == ["409"] * 5 + ["ok"]
    assert cluster.status("race")["leaseHolder"] == f"writer-{winners[0]}"


def test_delete_preconditions_uid_and_resource_version(cluster: Cluster) -> None:
    coordination = cluster.kube.coordination
    lease = coordination.create_namespaced_lease(cluster.ns, {"metadata": {"name": "held"}, "spec": {"holderIdentity": "a"}})
    uid, version = lease.metadata.uid, lease.metadata.resource_version
    for pre, what in (({"uid": "not-" + uid}, "UID in precondition"), ({"resourceVersion": "1"}, "ResourceVersion in precondition")):
        with pytest.raises(kubernetes.client.ApiException) as err:
            coordination.delete_namespaced_lease("held", cluster.ns, body={"preconditions": pre})
        assert status_of(err) == (409, "Conflict") and what in err.value.body
    assert coordination.read_namespaced_lease("held", cluster.ns).metadata.uid == uid  # still there
    coordination.delete_namespaced_lease("held", cluster.ns, body={"preconditions": {"uid": uid, "resourceVersion": version}})
    with pytest.raises(kubernetes.client.ApiException) as err:
        coordination.read_namespaced_lease("held", cluster.ns)
    assert err.value.status == 404
    # a re-created namesake has another uid: the old precondition no longer deletes it
    coordination.create_namespaced_lease(cluster.ns, {"metadata": {"name": "held"}, "spec": {"holderIdentity": "b"}})
    with pytest.raises(kubernetes.client.ApiException) as err:
        coordination.delete_namespaced_lease("held", cluster.ns, body={"preconditions": {"uid": uid}})
    assert err.value.status == 409


def test_generation_tracks_spec_changes_only(cluster: Cluster) -> None:
    ext = kubernetes.client.ApiextensionsV1Api()
    try:
        ext.create_custom_resource_definition({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{WIDGETS['plural']}.{WIDGETS['group']}"},
            "spec": {"group": WIDGETS["group"], "scope": "Namespaced",
                     "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": {"type": "object"}}}]}})
    except kubernetes.client.ApiException as exc:
        assert exc.status == 409  # another run of this test in the session registered it
    custom = cluster.kube.custom
    args = (WIDGETS["group"], WIDGETS["version"], cluster.ns, WIDGETS["plural"])
    widget = custom.create_namespaced_custom_object(*args, {"apiVersion": "semantics.sifoverlay.dev/v1", "kind": "Widget",
                                                            "metadata": {"name": "w", "generation": 7},
                                                            "spec": {"size": 1}})
    assert widget["metadata"]["generation"] == 1  # server-set, the client's 7 ignored

    def generation() -> int:
        return int(custom.get_namespaced_custom_object(*args, "w")["metadata"]["generation"])

    custom.patch_namespaced_custom_object_status(*args, "w", {"status": {"observedGeneration": 1}})
    custom.patch_namespaced_custom_object(*args, "w", {"metadata": {"labels": {"x": "y"}, "generation": 9}})
    custom.patch_namespaced_custom_object(*args, "w", {"spec": {"size": 1}})  # no change
    assert generation() == 1
    custom.patch_namespaced_custom_object(*args, "w", {"spec": {"size": 2}})
    assert generation() == 2
    custom.patch_namespaced_custom_object(*args, "w", [{"op": "replace", "path": "/spec/size", "value": 3}])
    assert generation() == 3
    custom.patch_namespaced_custom_object(*args, "w", [{"op": "add", "path": "/metadata/labels/z", "value": "1"}])
    assert generation() == 3
    # an OverlayJob's spec is immutable (the CRD's CEL rule self == oldSelf), so its
    # generation stays 1, and its status writes never move it: observedGeneration == generation
    cluster.create_overlayjob("gen")
    custom.patch_namespaced_custom_object_status(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "gen",
                                                 {"status": {"phase": "Pending", "observedGeneration": 1}})
    assert cluster.get("gen")["metadata"]["generation"] == 1


def test_the_crd_cel_rule_keeps_the_spec_immutable(cluster: Cluster) -> None:
    pytest.importorskip("celpy", reason="cel-python (test extra) evaluates the CRD's CEL rules in the test server")
    cluster.create_overlayjob("frozen")
    with pytest.raises(kubernetes.client.ApiException) as err:
        cluster.kube.custom.patch_namespaced_custom_object(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "frozen",
                                                           {"spec": {"mode": "ro"}})
    assert status_of(err) == (422, "Invalid")
    assert "spec: Invalid value: spec is immutable; delete and re-create the OverlayJob" in err.value.body
    assert cluster.get("frozen")["spec"].get("mode", "rw") == "rw" and cluster.get("frozen")["metadata"]["generation"] == 1
    # metadata and status remain writable
    cluster.kube.custom.patch_namespaced_custom_object(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "frozen",
                                                       {"metadata": {"labels": {"ok": "yes"}}})
