"""The chart's ValidatingAdmissionPolicy, evaluated with a real CEL interpreter.

kmock runs no admission, so the CEL expressions the chart renders are compiled and run
here with cel-python (PyPI `cel-python`) against allowed and refused OverlayJobs, in the
activation a kube-apiserver gives a ValidatingAdmissionPolicy (`object`, `request`).
Every refused object breaks exactly one rule, and the operator's own check
(sifoverlay.k8s.policy, run before it acts) refuses it too, naming the same rule: the
two enforcement points agree. What only a real cluster shows: that kube-apiserver's CEL
(cel-go with the Kubernetes libraries and the CRD's structural schema for typing)
compiles these expressions - the tests keep to the CEL core both implement.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sifoverlay.k8s import policy as pol
from sifoverlay.k8s.policy import PolicyViolation
from tests.k8s.test_k8s_chart import EXAMPLE, POLICY_VALUES, render

celpy = pytest.importorskip("celpy", reason="cel-python (test extra) evaluates the chart's CEL")
RUNNER = "ghcr.io/sifoverlay/operator:0.1.0"


def example(namespace: str = "ml-team", **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["metadata"].update(namespace=namespace, uid="0" * 36)
    body["spec"].update(spec)
    return body


def workload(**changes: Any) -> dict[str, Any]:
    w = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"]["workload"])
    w.update(changes)
    return w


def template_volumes(*volumes: dict[str, Any]) -> dict[str, Any]:
    w = workload()
    w["template"]["spec"]["volumes"] = list(volumes)
    w["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": v["name"], "mountPath": f"/m/{v['name']}"}
                                                             for v in volumes]
    return w


@pytest.fixture(scope="module")
def admission(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = render(tmp_path_factory.mktemp("vap"), {"policy": POLICY_VALUES})
    [vap] = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    [binding] = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    return vap, binding


def refusals(vap: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """The messages of the validations `obj` fails, as kube-apiserver would report them."""
    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(json.loads(json.dumps(obj))),
                  "request": celpy.json_to_cel({"namespace": obj["metadata"]["namespace"], "operation": "CREATE"})}
    failed = []
    for validation in vap["spec"]["validations"]:
        result = env.program(env.compile(validation["expression"])).evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), f"{validation['expression']} -> {result!r}"
        if not result:
            if "messageExpression" in validation:
                failed.append(str(env.program(env.compile(validation["messageExpression"])).evaluate(activation)))
            else:
                failed.append(validation["message"])
    return failed


def operator_verdict(obj: dict[str, Any]) -> str | None:
    try:
        pol.check(obj, pol.from_json(json.dumps(POLICY_VALUES)), runner_image=RUNNER)
    except PolicyViolation as exc:
        return exc.rule
    return None


def test_the_policy_matches_overlayjobs_only_and_denies(admission: tuple[dict[str, Any], dict[str, Any]]) -> None:
    vap, binding = admission
    assert vap["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert vap["spec"]["matchConstraints"]["resourceRules"] == [{
        "apiGroups": ["sifoverlay.dev"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
        "resources": ["overlayjobs"]}]  # not overlayjobs/status: the operator's status writes pass
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    assert all(v["reason"] == "Forbidden" for v in vap["spec"]["validations"])


ALLOWED = {
    "documented example": example(),
    "hostPath below the prefix": example(image={"hostPath": {"path": "/data/images/ml"}, "path": "pytorch.sif"}),
    "the team's PVC in its namespace": example("team-a", image={"persistentVolumeClaim": {"claimName": "data"},
                                                                "path": "a.sif"}),
    "runner image named explicitly": example(workload=workload(image=RUNNER)),
    "no uid named (policy default)": example(workload={"command": ["true"]}),
}


@pytest.mark.parametrize("name", ALLOWED)
def test_allowed_objects_pass_admission_and_the_operator(name: str, admission: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert refusals(admission[0], ALLOWED[name]) == []
    assert operator_verdict(ALLOWED[name]) is None


REFUSED = {
    # attack: an image from a host directory outside the admin's list (hostPath: / would own the node)
    "hostPath outside policy": (example(image={"hostPath": {"path": "/etc"}, "path": "shadow"}), "imageVolumes",
                                "rule imageVolumes: hostPath /etc is not under a hostPath prefix allowed in namespace ml-team"),
    "hostPath sibling with the prefix as a string prefix": (
        example(image={"hostPath": {"path": "/data/images-private"}, "path": "a.sif"}), "imageVolumes",
        "rule imageVolumes: hostPath /data/images-private is not under a hostPath prefix allowed in namespace ml-team"),
    "hostPath climbing out with ..": (
        example(image={"hostPath": {"path": "/data/images/../../etc"}, "path": "passwd"}), "imageVolumes",
        "rule imageVolumes: spec.image.hostPath.path must be absolute and normalised (no '.', '..' or empty segments)"),
    "PVC of another namespace's rule": (
        example("ml-team", image={"persistentVolumeClaim": {"claimName": "data"}, "path": "a.sif"}), "imageVolumes",
        "rule imageVolumes: PVC data is not an image volume allowed in namespace ml-team"),
    # attack: the privileged (mounting) container from an image the user chose
    "user-chosen runner image": (example(workload=workload(image="evil.example/rootkit:1")), "runnerImage",
                                 "rule runnerImage: the overlay is mounted by the operator's runner image "
                                 "ghcr.io/sifoverlay/operator:0.1.0; spec.workload.image must be absent"),
    "uid below the admin's range": (example(workload=workload(runAsUser=999)), "runAsUser",
                                    "rule runAsUser: spec.workload.runAsUser must be within 1000..65534"),
    "gid above the admin's range": (example(workload=workload(runAsGroup=70000)), "runAsGroup",
                                    "rule runAsGroup: spec.workload.runAsGroup must be within 1000..65534"),
    "hostPath volume in the pod template": (
        example(workload=template_volumes({"name": "root", "hostPath": {"path": "/"}})), "workloadVolumes",
        "rule workloadVolumes: template volumes need exactly one source of configMap, secret, emptyDir, "
        "persistentVolumeClaim and a name other than image, work, fuse"),
    "a volume type the admin did not list": (
        example(workload=template_volumes({"name": "p", "projected": {"sources": []}})), "workloadVolumes",
        "rule workloadVolumes: template volumes need exactly one source of configMap, secret, emptyDir, "
        "persistentVolumeClaim and a name other than image, work, fuse"),
    # attack: steer the root runner before it drops privileges (LD_PRELOAD from a mounted
    # configMap, PATH to a user volume, the runtime's own settings)
    "LD_PRELOAD for the root runner": (
        example(workload=workload(env=[{"name": "LD_PRELOAD", "value": "/m/evil.so"}])), "workloadEnv",
        "rule workloadEnv: environment variables that steer the root runner (LD_*, PYTHON*, SIFOVERLAY_*, PATH, HOME, ...) "
        "are not allowed"),
    "PATH from a configMap in the template": (
        example(workload=workload(template={"spec": {"containers": [{"env": [
            {"name": "PATH", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "p"}}}]}]}})), "workloadEnv",
        "rule workloadEnv: environment variables that steer the root runner (LD_*, PYTHON*, SIFOVERLAY_*, PATH, HOME, ...) "
        "are not allowed"),
    "a template volume shadowing the image volume": (
        example(workload=template_volumes({"name": "image", "emptyDir": {}})), "workloadVolumes",
        "rule workloadVolumes: template volumes need exactly one source of configMap, secret, emptyDir, "
        "persistentVolumeClaim and a name other than image, work, fuse"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_objects_fail_exactly_one_rule_at_admission_and_in_the_operator(
        name: str, admission: tuple[dict[str, Any], dict[str, Any]]) -> None:
    obj, rule, message = REFUSED[name]
    assert refusals(admission[0], obj) == [message]
    assert operator_verdict(obj) == rule


def test_a_mount_over_the_runner_paths_is_refused(admission: tuple[dict[str, Any], dict[str, Any]]) -> None:
    for path in ("/sifoverlay/image", "/run", "/dev/fuse", "/data/../sifoverlay"):
        w = workload()
        w["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = path
        obj = example(workload=w)
        assert refusals(admission[0], obj) == [
            "rule workloadVolumes: volumeMounts must be normalised absolute paths outside "
            "/sifoverlay, /run/sifoverlay, /dev, /proc, /sys"], path
        assert operator_verdict(obj) == "workloadVolumes", path


def test_no_image_volume_listed_refuses_every_overlayjob(tmp_path: Path) -> None:
    [vap] = [d for d in render(tmp_path) if d["kind"] == "ValidatingAdmissionPolicy"]
    assert refusals(vap, example()) == [
        "rule imageVolumes: hostPath /data/images is not under a hostPath prefix allowed in namespace ml-team"]
    with pytest.raises(PolicyViolation, match=r"rule imageVolumes: hostPath /data/images is not an image volume "
                                              r"allowed in namespace ml-team \(allowed: none\)"):
        pol.check(example(), pol.from_json(""), runner_image=RUNNER)


def test_the_forbidden_env_pattern_is_the_operators(admission: tuple[dict[str, Any], dict[str, Any]]) -> None:
    [validation] = [v for v in admission[0]["spec"]["validations"] if v.get("message", "").startswith("rule workloadEnv")]
    assert json.dumps(f"^({pol.FORBIDDEN_ENV})$") in validation["expression"]
    for name, bad in (("LD_LIBRARY_PATH", True), ("PYTHONPATH", True), ("SIFOVERLAY_RUNTIME_DIR", True), ("PATH", True),
                      ("OMP_NUM_THREADS", False), ("MYPATH", False), ("HOME_DIR", False)):
        obj = example(workload=workload(env=[{"name": name, "value": "x"}]))
        assert bool(refusals(admission[0], obj)) is bad, name
        assert (operator_verdict(obj) == "workloadEnv") is bad, name


def test_the_root_directory_as_hostpath_breaks_two_rules(admission: tuple[dict[str, Any], dict[str, Any]]) -> None:
    obj = example(image={"hostPath": {"path": "/"}, "path": "etc/shadow"})  # hostPath: / would own the node
    assert refusals(admission[0], obj) == [
        "rule imageVolumes: spec.image.hostPath.path must be absolute and normalised (no '.', '..' or empty segments)",
        "rule imageVolumes: hostPath / is not under a hostPath prefix allowed in namespace ml-team"]
    assert operator_verdict(obj) == "imageVolumes"


def test_a_default_user_outside_the_bounds_does_not_render(tmp_path: Path) -> None:
    from tests.k8s.test_k8s_chart import CHART, helm

    result = helm("template", "rel", str(CHART), "--set", "policy.defaultUser.uid=10", check=False)
    assert result.returncode == 1 and "policy.defaultUser.uid 10 is outside policy.runAsUser" in result.stderr


def test_admission_can_be_switched_off(tmp_path: Path) -> None:
    docs = render(tmp_path, {"policy": {**POLICY_VALUES, "admission": {"enabled": False}}})
    assert not [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
