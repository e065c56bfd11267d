"""RBAC audit: every API call the operator made is allowed by the chart's rendered rules,
and every rule the chart grants is used (dropping any one verb leaves a call unallowed).

kmock enforces no RBAC, so the check is offline: the API server logs each request
(kmock_server.py, KMOCK_AUDIT_LOG); calls from the operator are those whose User-Agent
is kopf's ("kopf/...") or the operator's own client (well_known.USER_AGENT). This test
drives one lifecycle itself (a waiting second resource, success, deletion), and, when it
runs after the other tests of the session, also audits all their calls (failures, pod
events, reconcile Jobs, the crashed and restarted operator).
Limitation: Leases are checked against the Role, whose namespace is the operator's
Lease namespace (each test's own namespace here; the release namespace in the chart).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sifoverlay.k8s import well_known as wk
from tests.k8s.conftest import Cluster, Kube, Site, kopf_runner, wait_for, write_into_overlay
from tests.k8s.test_k8s_chart import CHART, helm

pytestmark = pytest.mark.k8s
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch", "DELETE": "delete"}
Call = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
Rule = tuple[str, str, str, str]  # (role kind, apiGroup, resource, verb)


def operator_calls(audit_log: Path) -> set[Call]:
    calls: set[Call] = set()
    for line in audit_log.read_text().splitlines():
        record = json.loads(line)
        agent = record["agent"]
        if not (agent.startswith("kopf/") or agent == wk.USER_AGENT):
            continue
        if record["plural"] is None:  # API discovery: allowed to everyone by system:discovery
            continue
        resource = record["plural"] + (f"/{record['subresource']}" if record["subresource"] else "")
        calls.add((record["group"], resource, VERBS[record["verb"]]))
    return calls


def rendered_rules(tmp_path: Path) -> set[Rule]:
    rendered = helm("template", "rel", str(CHART), "--namespace", "sifoverlay-system").stdout
    rules: set[Rule] = set()
    for doc in (d for d in yaml.safe_load_all(rendered) if d):
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            rules.add((doc["kind"], group, resource, verb))
    return rules


def gaps(calls: set[Call], rules: set[Rule]) -> list[Call]:
    allowed = {(g, r, v) for _kind, g, r, v in rules}
    assert not any(v == "*" or r == "*" for _k, _g, r, v in rules), "wildcards are not least privilege"
    return sorted(c for c in calls if c not in allowed)


def drive_lifecycle(site: Site, cluster: Cluster, vectors: Path) -> None:
    image = site.make_image(vectors)
    with kopf_runner():
        cluster.create_overlayjob("audited", ttlSecondsAfterFinished=2)  # deleted (uid precondition) when due
        cluster.wait_phase("audited", "Running")
        cluster.create_overlayjob("queued")
        cluster.wait_phase("queued", "Waiting")
        pod = cluster.start_pod(cluster.wait_job("audited-run"))
        write_into_overlay(image, "a.txt", b"a\n", site.work)
        cluster.pod_phase(pod, "Succeeded")
        cluster.finish_job("audited-run", "Complete")
        cluster.wait_phase("audited", "Succeeded")
        cluster.wait_phase("queued", "Running")
        cluster.kube.custom.delete_namespaced_custom_object(wk.GROUP, wk.VERSION, cluster.ns, wk.PLURAL, "queued")
        wait_for("queued gone", lambda: cluster.get("queued") is None)
        wait_for("audited deleted (ttlSecondsAfterFinished)", lambda: cluster.get("audited") is None)


def test_every_operator_call_is_allowed_and_every_granted_verb_is_used(
        tmp_path: Path, kube: Kube, site: Site, cluster: Cluster, vectors: Path) -> None:
    drive_lifecycle(site, cluster, vectors)
    calls = operator_calls(kube.audit_log)
    rules = rendered_rules(tmp_path)
    agents = {json.loads(line)["agent"].split("/")[0] for line in kube.audit_log.read_text().splitlines()}
    assert {"kopf", wk.USER_AGENT.split("/")[0]} <= agents
    # both clients were seen, and the calls that matter most are among them
    assert {("sifoverlay.dev", "overlayjobs/status", "patch"), ("batch", "jobs", "create"),
            ("coordination.k8s.io", "leases", "create"), ("coordination.k8s.io", "leases", "delete"),
            ("sifoverlay.dev", "overlayjobs", "watch"), ("", "pods", "list"), ("", "events", "create"),
            ("sifoverlay.dev", "overlayjobs", "delete")} <= calls
    assert gaps(calls, rules) == [], f"RBAC gaps: {gaps(calls, rules)}"
    # Leases only through the namespaced Role: nothing cluster-wide
    assert {(k, g) for k, g, r, v in rules if r == "leases"} == {("Role", "coordination.k8s.io")}
    # exactly the verbs used: dropping any one granted verb makes the audit fail
    for rule in sorted(rules):
        dropped = gaps(calls, rules - {rule})
        assert dropped == [rule[1:]], f"granted but unused: {rule}"


def test_a_rule_dropped_from_the_chart_is_reported(tmp_path: Path, kube: Kube) -> None:
    calls = {("sifoverlay.dev", "overlayjobs", "patch"), ("sifoverlay.dev", "overlayjobs/status", "patch")}
    rules = rendered_rules(tmp_path)
    without_patch = {r for r in rules if not (r[2] == "overlayjobs/status" and r[3] == "patch")}
    assert gaps(calls, without_patch) == [("sifoverlay.dev", "overlayjobs/status", "patch")]
    assert gaps(calls, rules) == []
