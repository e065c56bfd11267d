"""The Helm chart with the real helm binary (scripts/get-helm.sh), the rendered manifests
against the Kubernetes OpenAPI schemas (kubernetes-validate --strict), custom resources
against the chart's CRD (jsonschema), and the CRD against sifoverlay.k8s.well_known."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sifoverlay.k8s import builders, policy, well_known as wk
from sifoverlay.k8s.builders import PodPolicy
from sifoverlay.k8s.config import from_env
from tests.conftest import REPO, require_tool

CHART = REPO / "charts" / "sifoverlay"
HELM = REPO / ".tools" / "helm" / "helm"
VALIDATE = REPO / ".venv" / "bin" / "kubernetes-validate"
EXAMPLE = REPO / "docs" / "examples" / "overlayjob.yaml"
MIN_K8S = "1.30.0"  # Chart.yaml kubeVersion
POLICY_VALUES = {
    "imageVolumes": [{"name": "shared-images", "hostPathPrefix": "/data/images"},
                     {"name": "team-data", "persistentVolumeClaim": "data", "namespaces": ["team-a", "team-b"]}],
    "runAsUser": {"min": 1000, "max": 65534}, "runAsGroup": {"min": 1000, "max": 65534},
    "workloadVolumeTypes": ["configMap", "secret", "emptyDir", "persistentVolumeClaim"],
}
FULL_VALUES = {
    "policy": POLICY_VALUES,
    "image": {"digest": "sha256:" + "ab" * 32},
    "operator": {"imageVolumes": [{"name": "data", "hostPath": "/data/images"},
                                  {"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch"}}],
                 "journalDir": "/journal", "journalVolume": {"persistentVolumeClaim": {"claimName": "journal"}},
                 "extraArgs": ["--verbose"]},
    "workload": {"fuseAccess": "hostPath", "userNamespaces": True},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                "prometheusRule": {"enabled": True}},
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    require_tool(str(HELM))
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL)


NAMESPACED_VALUES = {**FULL_VALUES, "watchNamespaces": ["team-a", "team-b"]}
VALUES = {"default": None, "full": FULL_VALUES, "namespaced": NAMESPACED_VALUES}


def render(tmp_path: Path, values: dict[str, Any] | None = None, *, monitoring: bool = False) -> list[dict[str, Any]]:
    argv = ["template", "rel", str(CHART), "--namespace", "sifoverlay-system", "--include-crds"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        argv += ["--values", str(path)]
    if monitoring:
        argv += ["--api-versions", "monitoring.coreos.com/v1"]
    return [d for d in yaml.safe_load_all(helm(*argv).stdout) if d]


def operator_rules() -> dict[str, Any]:
    return yaml.safe_load((CHART / "files" / "operator-rules.yml").read_text())


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def crd() -> dict[str, Any]:
    [doc] = [d for d in yaml.safe_load_all((CHART / "crds" / f"{wk.CRD_NAME}.yaml").read_text()) if d]
    return doc


def test_helm_lint_strict_passes_with_default_full_and_namespaced_values(tmp_path: Path) -> None:
    assert "1 chart(s) linted, 0 chart(s) failed" in helm("lint", "--strict", str(CHART)).stdout
    for name in ("full", "namespaced"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(VALUES[name]))
        assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "--values", str(path)).stdout


@pytest.mark.parametrize("setting, message", [
    ("replicaCount=2", "at '/replicaCount': maximum: got 2, want 1"),
    ("workload.fuseAccess=root", "at '/workload/fuseAccess': value must be one of 'devicePlugin', 'hostPath', 'privileged'"),
    ("metrics.serviceMonitor.interval=30 seconds", "at '/metrics/serviceMonitor/interval'"),
    ("bogus=1", "additional properties 'bogus' not allowed"),
    ("policy.runAsUser.min=0", "at '/policy/runAsUser/min': minimum: got 0, want 1"),
    ("image.digest=latest", "at '/image/digest'"),
])
def test_values_schema_rejects_bad_values(setting: str, message: str) -> None:
    result = helm("template", "rel", str(CHART), "--set", setting, check=False)
    assert result.returncode == 1
    assert message in result.stderr


BASE_KINDS = ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Role", "RoleBinding",
              "Service", "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]


def test_monitoring_objects_follow_the_value_only(tmp_path: Path) -> None:
    """Gated on `.enabled` alone: `helm template` and GitOps tools (no API discovery)
    render the same objects as `helm install` against a live cluster."""
    assert kinds(render(tmp_path)) == BASE_KINDS
    assert kinds(render(tmp_path, monitoring=True)) == BASE_KINDS  # API served, but not enabled
    with_monitoring = sorted(BASE_KINDS + ["PrometheusRule", "ServiceMonitor"])
    assert kinds(render(tmp_path, FULL_VALUES)) == with_monitoring  # enabled, no API discovery
    assert kinds(render(tmp_path, FULL_VALUES, monitoring=True)) == with_monitoring


def test_cluster_and_namespaced_modes(tmp_path: Path) -> None:
    def rbac(docs: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return {(d["kind"], d["metadata"].get("namespace", "")): d["rules"] for d in docs if d["kind"] in ("Role", "ClusterRole")}

    def command(docs: list[dict[str, Any]]) -> list[str]:
        return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]

    crd_rule = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}
    cluster = render(tmp_path, FULL_VALUES)
    roles = rbac(cluster)
    assert set(roles) == {("ClusterRole", ""), ("Role", "sifoverlay-system")}
    assert crd_rule in roles[("ClusterRole", "")] and len(roles[("ClusterRole", "")]) == 6
    assert "--all-namespaces" in command(cluster)
    namespaced = render(tmp_path, NAMESPACED_VALUES)
    roles = rbac(namespaced)
    assert set(roles) == {("ClusterRole", ""), ("Role", "sifoverlay-system"), ("Role", "team-a"), ("Role", "team-b")}
    assert roles[("ClusterRole", "")] == [crd_rule]  # only CRDs cluster-wide
    assert roles[("Role", "team-a")] == roles[("Role", "team-b")]
    # the per-namespace Role holds exactly the cluster mode's rules minus the CRD rule
    assert roles[("Role", "team-a")] == [r for r in rbac(cluster)[("ClusterRole", "")] if r != crd_rule]
    bindings = {(d["metadata"]["namespace"], d["roleRef"]["name"]) for d in namespaced if d["kind"] == "RoleBinding"}
    assert {("team-a", "rel-sifoverlay"), ("team-b", "rel-sifoverlay")} <= bindings
    assert "--all-namespaces" not in command(namespaced)
    assert [a for a in command(namespaced) if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]


def test_metrics_port_is_outside_the_exporter_range(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in render(tmp_path)}
    port = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert port == {"name": "metrics", "containerPort": 8081, "protocol": "TCP"}
    assert not 9100 <= port["containerPort"] <= 9999 and port["containerPort"] not in (9090, 9091, 9093, 9094)
    assert from_env({}).metrics_port == 8081


def test_service_monitor_and_rules_point_at_the_metrics_port(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in render(tmp_path, FULL_VALUES, monitoring=True)}
    monitor, service, rule = docs["ServiceMonitor"], docs["Service"], docs["PrometheusRule"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                             "scrapeTimeout": "10s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    rules_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yml").read_text())
    assert rule["spec"]["groups"] == rules_file["groups"] + operator_rules()["groups"] and rules_file["groups"]


@pytest.mark.parametrize("name", ["prometheus-rules.yml", "operator-rules.yml"])
def test_rules_files_pass_promtool(tmp_path: Path, name: str) -> None:
    require_tool("promtool")
    result = subprocess.run(["promtool", "check", "rules", str(CHART / "files" / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: [1-9][0-9]* rules found", result.stdout)


def test_operator_alerts_cover_the_operator_and_link_their_runbooks(tmp_path: Path) -> None:
    rules = {r["alert"]: r for g in operator_rules()["groups"] for r in g["rules"]}
    assert set(rules) == {"SifoverlayOperatorDown", "SifoverlayOperatorReconcileFailures", "SifoverlayOperatorPhaseStuck",
                          "SifoverlayOperatorLeaseHeldAfterFinish", "SifoverlayOperatorHandlerErrors"}
    from sifoverlay.k8s import metrics
    exported = {m.name for m in metrics.REGISTRY.collect()}
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in (REPO / "docs" / "operations.md").read_text().splitlines() if line.startswith("#")}
    for name, rule in rules.items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"https://github.com/sifoverlay/oci-sif-overlay/blob/main/docs/operations.md#{name.lower()}"
        assert name.lower() in headings, f"docs/operations.md has no section {name}"
        used = set(re.findall(r"sifoverlay_operator_[a-z_]+", rule["expr"]))
        assert used and {u.removesuffix("_total") for u in used} <= exported | {"sifoverlay_operator_build_info"}
    # the chart rewrites the runbook base for a fork or a mirror of the docs
    custom = {**FULL_VALUES, "metrics": {**FULL_VALUES["metrics"], "prometheusRule": {
        "enabled": True, "runbookBaseUrl": "https://wiki.example/ops"}}}
    rule = next(d for d in render(tmp_path, custom) if d["kind"] == "PrometheusRule")
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "runbook_url" in r["annotations"]]
    assert len(urls) == 7 and all(u.startswith("https://wiki.example/ops#sifoverlay") for u in urls)
    assert sum(u.startswith("https://wiki.example/ops#sifoverlayoperator") for u in urls) == 5


@pytest.mark.parametrize("version", [MIN_K8S, "1.37.0"])
@pytest.mark.parametrize("values", ["default", "full", "namespaced"])
def test_rendered_manifests_pass_kubernetes_validate_strict(tmp_path: Path, version: str, values: str) -> None:
    docs = render(tmp_path, VALUES[values])
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([str(VALIDATE), "--strict", "--quiet", "-k", version, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the only documents it cannot judge are the Prometheus Operator kinds (checked above)
    warned = sorted(line.split("kind ")[1].split(" ")[0] for line in result.stdout.splitlines() if "Couldn't find schema" in line)
    assert warned == (["PrometheusRule", "ServiceMonitor"] if values != "default" else [])
    assert "ERROR" not in result.stdout


def test_strict_validation_catches_a_bad_manifest(tmp_path: Path) -> None:
    docs = render(tmp_path)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    out = tmp_path / "bad.yaml"
    out.write_text(yaml.safe_dump(deployment))
    result = subprocess.run([str(VALIDATE), "--strict", "--quiet", "-k", MIN_K8S, str(out)], capture_output=True, text=True)
    assert result.returncode == 1 and "'bogusField' was unexpected" in result.stdout


def test_deployment_env_is_what_the_operator_reads(tmp_path: Path) -> None:
    docs = render(tmp_path, FULL_VALUES)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config = from_env(env)
    assert config.volume_roots == {"hostPath:/data/images": "/volumes/data", "pvc:sifoverlay-system/scratch": "/volumes/scratch"}
    assert config.lease_namespace == "sifoverlay-system" and config.journal_dir == "/journal"
    runner = "ghcr.io/sifoverlay/operator@sha256:" + "ab" * 32
    assert config.pod_policy == PodPolicy(fuse_access="hostPath", user_namespaces=True, operator_image=runner,
                                          admin=policy.from_json(json.dumps(POLICY_VALUES)))
    assert container["image"] == runner  # the runner of workload pods is the operator's own pinned image
    assert [r.describe() for r in config.pod_policy.admin.image_volumes] == [
        "shared-images (hostPath /data/images/...; all namespaces)", "team-data (PVC data; team-a,team-b)"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"tmp": "/tmp", "image-data": "/volumes/data", "image-scratch": "/volumes/scratch", "journal": "/journal"}
    assert container["command"][:4] == ["kopf", "run", "--standalone", "--all-namespaces"]
    assert container["command"][-1] == "/opt/sifoverlay/operator/main.py" and "--verbose" in container["command"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_crd_matches_well_known_strings() -> None:
    doc = crd()
    assert doc["metadata"]["name"] == wk.CRD_NAME
    assert (doc["spec"]["group"], doc["spec"]["scope"]) == (wk.GROUP, "Namespaced")
    assert doc["spec"]["names"]["kind"] == wk.KIND and doc["spec"]["names"]["plural"] == wk.PLURAL
    assert tuple(doc["spec"]["names"]["shortNames"]) == wk.SHORT_NAMES
    [version] = doc["spec"]["versions"]
    assert version["name"] == wk.VERSION and version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert tuple(status["phase"]["enum"]) == wk.PHASES
    assert set(status["jobResult"]["enum"]) == {wk.RESULT_SUCCEEDED, wk.RESULT_FAILED, wk.RESULT_EVICTED,
                                                wk.RESULT_POD_DELETED, wk.RESULT_JOB_DELETED, wk.RESULT_CANCELLED}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    for ctype, column in ((wk.COND_LEASE_ACQUIRED, "Lease"), (wk.COND_RECONCILED, "Reconciled"),
                          (wk.COND_DRIFT_DETECTED, "Drift")):
        assert columns[column] == f'.status.conditions[?(@.type=="{ctype}")].status'
    # every reason the operator can write fits the CRD's reason pattern
    reason = status["conditions"]["items"]["properties"]["reason"]["pattern"]
    reasons = [v for k, v in vars(wk).items() if k.startswith("REASON_")]
    assert reasons and all(jsonschema.Draft7Validator({"type": "string", "pattern": reason}).is_valid(r) for r in reasons)


EXAMPLE_POLICY = PodPolicy(admin=policy.from_json(json.dumps(POLICY_VALUES)))


def openapi() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_documented_example_is_valid_against_the_crd() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    assert list(openapi().iter_errors(example)) == []
    assert example["apiVersion"] == wk.API_VERSION and example["kind"] == wk.KIND
    job = builders.workload_job({**example, "metadata": {**example["metadata"], "uid": "u" * 36}}, policy=EXAMPLE_POLICY)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][-8:] == ["--user=1000:1000", "--bind=/sifoverlay/user/datasets:/datasets:ro",
                                         "/sifoverlay/image/ml/pytorch.sif", "--", "python3", "/opt/train.py", "--epochs", "3"]
    # the PodSpec subset of workload.template reaches the pod
    assert container["env"][1] == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    assert container["volumeMounts"][-1] == {"name": "datasets", "mountPath": "/sifoverlay/user/datasets", "readOnly": True}
    assert pod["volumes"][2] == {"name": "datasets", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": True}}
    assert (pod["priorityClassName"], pod["nodeSelector"]) == ("batch-low", {"node.kubernetes.io/instance-type": "gpu-large"})
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["resources"]["requests"]["cpu"] == "4"


@pytest.mark.parametrize("change, where", [
    ({"mode": "rwx"}, "spec.mode"),
    ({"mountMode": "loop"}, "spec.mountMode"),
    ({"workload": {"image": "x", "command": []}}, "spec.workload.command"),
    ({"workload": {"image": "x"}}, "spec.workload"),
    ({"image": {"path": "a.sif", "hostPath": {"path": "/d"}, "persistentVolumeClaim": {"claimName": "c"}}}, "spec.image"),
    ({"image": {"path": "/abs.sif", "hostPath": {"path": "/d"}}}, "spec.image.path"),
    ({"policy": {"deleteJobAfterSeconds": -1}}, "spec.policy.deleteJobAfterSeconds"),
    ({"policy": {"sealOnSuccess": "yes"}}, "spec.policy.sealOnSuccess"),
])
def test_bad_resources_are_invalid_against_the_crd(change: dict[str, Any], where: str) -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    example["spec"].update(change)
    errors = list(openapi().iter_errors(example))
    assert errors
    assert ".".join(map(str, errors[0].absolute_path)).startswith(where)


def test_builder_output_passes_kubernetes_validate_strict() -> None:
    import kubernetes_validate

    example = yaml.safe_load(EXAMPLE.read_text())
    example["metadata"]["uid"] = "0" * 36
    policies = [EXAMPLE_POLICY, PodPolicy(fuse_access="hostPath", user_namespaces=True, admin=EXAMPLE_POLICY.admin),
                PodPolicy(fuse_access="privileged", apparmor_unconfined=False, admin=EXAMPLE_POLICY.admin)]
    ref = builders.image_ref(example["spec"], "ml-team")
    import datetime as dt
    objects = [builders.workload_job(example, policy=p) for p in policies]
    objects.append(builders.reconcile_job(example, policy=PodPolicy()))
    objects.append(builders.lease(ref, namespace="sifoverlay-system", holder_namespace="ml-team",
                                  holder_name="train-resnet", holder_uid="0" * 36,
                                  now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), duration_seconds=3600))
    for obj in objects:
        for version in (MIN_K8S, "1.37.0"):
            kubernetes_validate.validate(json.loads(json.dumps(obj)), version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        bad = objects[0]
        bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "SYS_ADMIN"
        kubernetes_validate.validate(bad, MIN_K8S, strict=True)
