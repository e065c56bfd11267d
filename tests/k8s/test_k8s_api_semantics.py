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


def test_delete_with_a_finalizer_marks_the_object_as_a_write(cluster: Cluster) -> None:
    """As kube-apiserver's markAsDeleting: deletionTimestamp and a zero grace period, one
    generation bump, a new resourceVersion (so a precondition or patch at the old one is
    stale), a MODIFIED event; a second delete changes nothing; removing the finalizer
    deletes it (DELETED)."""
    custom = cluster.kube.custom
    args = (wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL)
    cluster.create_overlayjob("fin")
    before = custom.patch_namespaced_custom_object(*args, "fin", {"metadata": {"finalizers": ["test/hold"]}})
    watch = kubernetes.watch.Watch()
    seen: list[tuple[str, str, Any]] = []

    def follow() -> None:
        for event in watch.stream(custom.list_namespaced_custom_object, *args, resource_version=rv(before),
                                  timeout_seconds=30):
            meta = event["object"]["metadata"]
            seen.append((event["type"], meta["resourceVersion"], meta.get("deletionTimestamp")))
            if event["type"] == "DELETED":
                watch.stop()

    follower = threading.Thread(target=follow)
    follower.start()
    custom.delete_namespaced_custom_object(*args, "fin")
    marked = cluster.get("fin")
    meta = marked["metadata"]
    assert int(rv(marked)) > int(rv(before)) and meta["generation"] == before["metadata"]["generation"] + 1 == 2
    assert meta["deletionGracePeriodSeconds"] == 0 and meta["deletionTimestamp"].endswith("Z")
    with pytest.raises(kubernetes.client.ApiException) as err:  # a write at the version before the mark
        custom.patch_namespaced_custom_object(*args, "fin", {"metadata": {"labels": {"a": "1"},
                                                                          "resourceVersion": rv(before)}})
    assert status_of(err) == (409, "Conflict")
    custom.delete_namespaced_custom_object(*args, "fin")  # already marked: nothing changes
    assert cluster.get("fin")["metadata"] == meta
    custom.patch_namespaced_custom_object(*args, "fin", {"metadata": {"finalizers": None}})
    follower.join(30)
    assert cluster.get("fin") is None
    # the mark is the first event after the list; the last is DELETED (whether the finalizer
    # removal shows as a MODIFIED before it is not asserted: a real server's detail)
    assert seen[0] == ("MODIFIED", rv(marked), meta["deletionTimestamp"]) and seen[-1][0] == "DELETED"


def test_create_is_201_with_server_set_metadata_and_generate_name(cluster: Cluster) -> None:
    body = {"apiVersion": wk.API_VERSION, "kind": wk.KIND, "metadata": {"name": "meta", "uid": "mine"},
            "spec": {"image": {"hostPath": {"path": "/data/images"}, "path": "a.sif"}, "workload": {"command": ["x"]}},
            "status": {"phase": "Succeeded"}}
    created, code, _headers = cluster.kube.custom.create_namespaced_custom_object_with_http_info(
        wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, body)
    meta = created["metadata"]
    assert code == 201 and meta["namespace"] == cluster.ns and meta["uid"] != "mine" and len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z") and rv(created).isdigit() and meta["generation"] == 1
    assert "status" not in created  # the status subresource: a create does not set it
    made = cluster.kube.core.create_namespaced_config_map(cluster.ns, {"metadata": {"generateName": "cm-"}})
    assert made.metadata.name.startswith("cm-") and len(made.metadata.name) == len("cm-") + 5


def test_the_status_subresource_is_isolated_both_ways(cluster: Cluster) -> None:
    custom = cluster.kube.custom
    args = (wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "iso")
    cluster.create_overlayjob("iso")
    custom.patch_namespaced_custom_object(*args, {"metadata": {"labels": {"a": "1"}}, "status": {"phase": "Failed"}})
    assert cluster.get("iso").get("status") is None and cluster.get("iso")["metadata"]["labels"] == {"a": "1"}
    custom.patch_namespaced_custom_object_status(*args, {"metadata": {"labels": {"a": "2"}}, "spec": {"mode": "ro"},
                                                         "status": {"phase": "Running"}})
    obj = cluster.get("iso")
    assert obj["status"] == {"phase": "Running"} and obj["metadata"]["labels"] == {"a": "1"}
    assert obj["spec"].get("mode", "rw") == "rw"


def test_a_json_patch_test_op_that_fails_is_422_and_writes_nothing(cluster: Cluster) -> None:
    """kopf adds and removes its finalizer with a JSON patch that tests resourceVersion."""
    custom = cluster.kube.custom
    args = (wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "jp")
    version = rv(cluster.create_overlayjob("jp"))
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
             {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}]
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.patch_namespaced_custom_object(*args, stale)
    assert status_of(err) == (422, "Invalid") and rv(cluster.get("jp")) == version
    fresh = [{**stale[0], "value": version}, stale[1]]
    patched = custom.patch_namespaced_custom_object(*args, fresh)
    assert patched["metadata"]["finalizers"] == ["x/y"] and int(rv(patched)) > int(version)
    custom.patch_namespaced_custom_object(*args, {"metadata": {"finalizers": None}})


def test_label_selectors_on_list_and_dry_run_creates_nothing(cluster: Cluster) -> None:
    core = cluster.kube.core
    for name, labels in (("p1", {"a": "1", "b": "2"}), ("p2", {"a": "2"}), ("p3", {"c": "x"})):
        core.create_namespaced_pod(cluster.ns, {"metadata": {"name": name, "labels": labels},
                                                "spec": {"containers": [{"name": "c", "image": "i"}]}})

    def names(selector: str) -> list[str]:
        return sorted(p.metadata.name for p in core.list_namespaced_pod(cluster.ns, label_selector=selector).items)

    assert names("a=1") == ["p1"] and names("a!=1") == ["p2", "p3"] and names("a in (1,2)") == ["p1", "p2"]
    assert names("a notin (1)") == ["p2", "p3"] and names("!a") == ["p3"] and names("a,b==2") == ["p1"]
    core.create_namespaced_pod(cluster.ns, {"metadata": {"name": "dry"}, "spec": {"containers": [{"name": "c",
                                                                                                   "image": "i"}]}},
                               dry_run="All")
    assert names("") == ["p1", "p2", "p3"]


def test_a_watch_continues_its_list_without_replaying_or_losing_changes(cluster: Cluster) -> None:
    core = cluster.kube.core
    for name in ("kept", "changed"):
        core.create_namespaced_config_map(cluster.ns, {"metadata": {"name": name}})
    listed = core.list_namespaced_config_map(cluster.ns)
    assert sorted(c.metadata.name for c in listed.items) == ["changed", "kept"]
    # a change between the list and the watch: the watch from the list's version shows it,
    # and nothing the list already had
    changed = core.patch_namespaced_config_map("changed", cluster.ns, {"data": {"k": "v"}})
    watch = kubernetes.watch.Watch()
    events = []
    for event in watch.stream(core.list_namespaced_config_map, cluster.ns,
                              resource_version=listed.metadata.resource_version, timeout_seconds=5):
        events.append((event["type"], event["object"].metadata.name, event["object"].metadata.resource_version))
        watch.stop()
    assert events == [("MODIFIED", "changed", changed.metadata.resource_version)]
