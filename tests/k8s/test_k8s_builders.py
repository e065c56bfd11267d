"""The pure builders and status transitions, against exact dicts (no server)."""

from __future__ import annotations

import copy
from pathlib import Path
import datetime as dt

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.k8s import builders, names, status
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.builders import PodPolicy
from sifoverlay.k8s.config import from_env, parse_volume_roots
from sifoverlay.k8s.policy import AdminPolicy, VolumeRule

# the admin policy these builders run under: images only under /data/images (any namespace)
ADMIN = AdminPolicy(image_volumes=(VolumeRule("shared-images", "hostPath", "/data/images"),
                                   VolumeRule("team-a-data", "persistentVolumeClaim", "data", ("team-a",))))


def allowed(**kwargs: object) -> PodPolicy:
    return PodPolicy(admin=ADMIN, **kwargs)  # type: ignore[arg-type]

NOW = dt.datetime(2026, 11, 28, 9, 30, 15, 123456, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
UID = "0123456789abcdef-uid"
BODY = {
    "apiVersion": "sifoverlay.dev/v1alpha1",
    "kind": "OverlayJob",
    "metadata": {"name": "train", "namespace": "team-a", "uid": UID, "generation": 2},
    "spec": {
        "image": {"hostPath": {"path": "/data/images"}, "path": "ml/app.sif"},
        "workload": {"command": ["python", "train.py"], "runAsUser": 1000, "runAsGroup": 2000,
                     "env": [{"name": "A", "value": "1"}], "resources": {"limits": {"cpu": "2"}}},
    },
}
LABELS = {
    "app.kubernetes.io/managed-by": "sifoverlay-operator",
    "sifoverlay.dev/overlayjob": "train",
    "sifoverlay.dev/role": "workload",
    "sifoverlay.dev/image-key": names.image_key("hostPath:/data/images:ml/app.sif"),
}
ANNOTATIONS = {"sifoverlay.dev/overlayjob-name": "train", "sifoverlay.dev/image-identity": "hostPath:/data/images:ml/app.sif"}
OWNER = {"apiVersion": "sifoverlay.dev/v1alpha1", "kind": "OverlayJob", "name": "train", "uid": UID,
         "controller": True, "blockOwnerDeletion": True}


def with_spec(**changes: object) -> dict:
    body = copy.deepcopy(BODY)
    body["spec"].update(changes)
    return body


def test_workload_job_default_policy_is_device_plugin_fuse() -> None:
    assert builders.workload_job(BODY, policy=allowed()) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train-run", "namespace": "team-a", "labels": LABELS, "annotations": ANNOTATIONS,
                     "ownerReferences": [OWNER]},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": LABELS, "annotations": ANNOTATIONS},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "workload",
                        "image": "ghcr.io/sifoverlay/operator:0.1.0",
                        "command": ["sifoverlay", "exec", "--allow-root-options", "--writable", "--mount", "fuse",
                                    "--job-id", "k8s-team-a-train-01234567",
                                    "--journal-dir", "/sifoverlay/image/.sifoverlay-journal", "--user=1000:2000",
                                    "/sifoverlay/image/ml/app.sif", "--", "python", "train.py"],
                        "env": [{"name": "A", "value": "1"},
                                {"name": "SIFOVERLAY_STATE_DIR", "value": "/sifoverlay/image/.sifoverlay-state"}],
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsGroup": 0,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"],
                                             "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "SYS_ADMIN"]},
                            "seccompProfile": {"type": "RuntimeDefault"},
                            "appArmorProfile": {"type": "Unconfined"},
                        },
                        "volumeMounts": [{"name": "image", "mountPath": "/sifoverlay/image"},
                                         {"name": "work", "mountPath": "/run/sifoverlay"}],
                        "resources": {"limits": {"cpu": "2", "smarter-devices/fuse": "1"},
                                      "requests": {"smarter-devices/fuse": "1"}},
                    }],
                    "volumes": [{"name": "image", "hostPath": {"path": "/data/images", "type": "Directory"}},
                                {"name": "work", "emptyDir": {}}],
                    "automountServiceAccountToken": False,
                },
            },
        },
    }


def test_workload_job_host_path_fuse_device_and_user_namespaces() -> None:
    policy = allowed(fuse_access="hostPath", user_namespaces=True, apparmor_unconfined=False)
    pod = builders.workload_job(BODY, policy=policy)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostUsers"] is False
    assert pod["volumes"][-1] == {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}}
    assert container["volumeMounts"][-1] == {"name": "fuse", "mountPath": "/dev/fuse"}
    assert container["resources"] == {"limits": {"cpu": "2"}}  # no device-plugin resource
    assert container["securityContext"] == {"runAsUser": 0, "runAsGroup": 0, "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"], "add": list(builders.RUNNER_CAPABILITIES)},
                                            "seccompProfile": {"type": "RuntimeDefault"}}


def test_read_only_mode_runs_exec_without_writable() -> None:
    container = builders.workload_job(with_spec(mode="ro"), policy=allowed())["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["sifoverlay", "exec", "--allow-root-options", "--mount"]
    assert container["command"][10:12] == ["/sifoverlay/image/ml/app.sif", "--"]
    # the volume stays writable: a reader takes a shared lease file beside the image
    assert container["volumeMounts"][0] == {"name": "image", "mountPath": "/sifoverlay/image"}


def test_kernel_mounts_need_operator_opt_in_and_are_privileged() -> None:
    with pytest.raises(UsageError, match="OverlayJob team-a/train: spec.mountMode kernel is disabled"):
        builders.workload_job(with_spec(mountMode="kernel"), policy=allowed())
    job = builders.workload_job(with_spec(mountMode="kernel"), policy=allowed(allow_kernel_mounts=True, user_namespaces=True))
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"] == {"privileged": True}
    assert pod["containers"][0]["command"][3:6] == ["--writable", "--mount", "kernel"]
    assert "hostUsers" not in pod  # a privileged pod cannot use a user namespace
    assert pod["containers"][0]["resources"] == {"limits": {"cpu": "2"}}


def test_pvc_image_and_reconcile_job() -> None:
    body = with_spec(image={"persistentVolumeClaim": {"claimName": "data"}, "path": "app.sif"})
    ref = builders.image_ref(body["spec"], "team-a")
    assert ref.identity == "pvc:team-a/data:app.sif"
    assert ref.local_path({"pvc:team-a/data": "/mnt/data"}) == "/mnt/data/app.sif"
    assert ref.local_path({"pvc:team-b/data": "/mnt/data"}) is None
    job = builders.reconcile_job(body, policy=allowed(operator_image="op:1"))
    assert job["metadata"]["name"] == "train-reconcile"
    assert job["metadata"]["labels"][wk.LABEL_ROLE] == "reconcile"
    assert job["spec"]["backoffLimit"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "image", "persistentVolumeClaim": {"claimName": "data"}}]
    assert pod["containers"][0]["image"] == "op:1"
    assert pod["containers"][0]["command"][-2:] == ["/sifoverlay/image/app.sif", "k8s-team-a-train-01234567"]
    assert pod["containers"][0]["env"] == [{"name": "SIFOVERLAY_JOURNAL_DIR", "value": "/sifoverlay/image/.sifoverlay-journal"},
                                           {"name": "SIFOVERLAY_STATE_DIR", "value": "/sifoverlay/image/.sifoverlay-state"}]
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("image, problem", [
    ({"hostPath": {"path": "/d"}, "path": "../etc/shadow"}, "without '..'"),
    ({"hostPath": {"path": "/d"}, "path": "/abs.sif"}, "without '..'"),
    ({"hostPath": {"path": "d"}, "path": "a.sif"}, "must be absolute"),
    ({"hostPath": {"path": "/d"}, "persistentVolumeClaim": {"claimName": "c"}, "path": "a.sif"}, "exactly one of"),
    ({"path": "a.sif"}, "exactly one of"),
])
def test_image_ref_rejects_bad_paths_in_one_line(image: dict, problem: str) -> None:
    with pytest.raises(UsageError) as err:
        builders.image_ref({"image": image}, "ns", name="x")
    assert str(err.value).startswith("OverlayJob ns/x: spec.image")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_names_fit_63_chars_and_stay_unique() -> None:
    assert names.workload_job_name("train") == "train-run"
    long_a, long_b = "a" * 80, "a" * 79 + "b"
    name_a, name_b = names.workload_job_name(long_a), names.workload_job_name(long_b)
    assert len(name_a) == 63 and len(name_b) == 63 and name_a != name_b
    assert name_a.endswith("-run") and names.check_dns_label(name_a) == name_a
    assert names.workload_job_name(long_a) == name_a  # stable across handler re-runs
    assert len(names.reconcile_job_name("x" * 253)) == 63
    assert names.lease_name("hostPath:/d:a.sif") == "sifoverlay-image-" + names.image_key("hostPath:/d:a.sif")
    assert len(names.lease_name("hostPath:/d:a.sif")) == 37
    with pytest.raises(UsageError, match="is not a DNS label"):
        names.check_dns_label("Bad_Name")


def test_lease_names_holder_and_times() -> None:
    ref = builders.image_ref(BODY["spec"], "team-a")
    lease = builders.lease(ref, namespace="sifoverlay-system", holder_namespace="team-a", holder_name="train",
                           holder_uid=UID, now=NOW, duration_seconds=3600)
    key = names.image_key("hostPath:/data/images:ml/app.sif")
    assert lease == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": f"sifoverlay-image-{key}",
            "namespace": "sifoverlay-system",
            "labels": {"app.kubernetes.io/managed-by": "sifoverlay-operator", "sifoverlay.dev/image-key": key},
            "annotations": {"sifoverlay.dev/image-identity": "hostPath:/data/images:ml/app.sif",
                            "sifoverlay.dev/holder-uid": UID},
        },
        "spec": {"holderIdentity": "team-a/train", "leaseDurationSeconds": 3600,
                 "acquireTime": "2026-11-28T09:30:15.123456Z", "renewTime": "2026-11-28T09:30:15.123456Z"},
    }
    assert builders.lease_holder(lease) == ("team-a/train", UID)
    # the same host file seen from another namespace is the same Lease
    other = builders.image_ref(BODY["spec"], "team-b")
    assert names.lease_name(other.identity) == lease["metadata"]["name"]


def test_set_conditions_keeps_transition_time_unless_status_flips() -> None:
    first = builders.condition(wk.COND_JOB_RUNNING, True, wk.REASON_JOB_STARTED, "Job x created", generation=1, now=NOW)
    assert first == {"type": "JobRunning", "status": "True", "reason": "JobStarted", "message": "Job x created",
                     "observedGeneration": 1, "lastTransitionTime": "2026-11-28T09:30:15Z"}
    same = builders.condition(wk.COND_JOB_RUNNING, True, wk.REASON_JOB_STARTED, "still", generation=1, now=LATER)
    flipped = builders.condition(wk.COND_JOB_RUNNING, False, wk.REASON_JOB_FAILED, "x", generation=1, now=LATER)
    lease = builders.condition(wk.COND_LEASE_ACQUIRED, True, wk.REASON_ACQUIRED, "y", generation=1, now=LATER)
    merged = builders.set_conditions([first], same, lease)
    assert [c["type"] for c in merged] == ["LeaseAcquired", "JobRunning"]  # CONDITION_TYPES order
    assert merged[1]["lastTransitionTime"] == "2026-11-28T09:30:15Z" and merged[1]["message"] == "still"
    assert builders.set_conditions([first], flipped)[0]["lastTransitionTime"] == "2026-11-28T09:35:15Z"


def test_status_phase_machine_success_path() -> None:
    waiting = status.waiting({}, identity="hostPath:/d:a.sif", holder="ns/first", generation=1, now=NOW)
    assert waiting["phase"] == "Waiting" and waiting["leaseHolder"] == "ns/first"
    assert waiting["conditions"] == [{"type": "LeaseAcquired", "status": "False", "reason": "HeldByOther",
                                      "message": "image hostPath:/d:a.sif is held by OverlayJob ns/first; waiting for its Lease",
                                      "observedGeneration": 1, "lastTransitionTime": "2026-11-28T09:30:15Z"}]
    run = status.started(waiting, identity="hostPath:/d:a.sif", holder="ns/me", job_name="me-run",
                         digest_before="sha256:aa", manifest_digest="sha256:mm", generation=1, now=LATER)
    assert {k: run[k] for k in ("phase", "leaseHolder", "jobName", "overlayDigestBefore", "manifestDigest")} == {
        "phase": "Running", "leaseHolder": "ns/me", "jobName": "me-run", "overlayDigestBefore": "sha256:aa",
        "manifestDigest": "sha256:mm"}
    assert [(c["type"], c["status"], c["reason"]) for c in run["conditions"]] == [
        ("LeaseAcquired", "True", "Acquired"), ("JobRunning", "True", "JobStarted")]
    ended = status.job_ended({**waiting, **run}, result=wk.RESULT_SUCCEEDED, message="done", generation=1, now=LATER)
    assert ended["phase"] == "Reconciling" and ended["jobResult"] == "Succeeded"
    done = status.reconciled({**run, **ended}, action="reconciled", replayed=False, digest_after="sha256:bb",
                             manifest_digest="sha256:m2", generation=1, now=LATER)
    assert done["phase"] == "Succeeded" and done["leaseHolder"] is None
    assert done["lastReconcileTime"] == "2026-11-28T09:35:15Z" and done["overlayDigestAfter"] == "sha256:bb"
    assert [(c["type"], c["status"], c["reason"]) for c in done["conditions"]] == [
        ("LeaseAcquired", "False", "Released"), ("Mounted", "False", "Unmounted"), ("JobRunning", "False", "JobSucceeded"),
        ("Reconciling", "False", "Done"), ("Reconciled", "True", "OverlayChanged")]


@pytest.mark.parametrize("result, reason", [(wk.RESULT_FAILED, "JobFailed"), (wk.RESULT_EVICTED, "PodEvicted"),
                                            (wk.RESULT_CANCELLED, "ResourceDeleted")])
def test_status_failed_workloads_still_reconcile(result: str, reason: str) -> None:
    ended = status.job_ended({}, result=result, message="m", generation=3, now=NOW)
    done = status.reconciled({**ended, "overlayDigestBefore": "sha256:aa"}, action="noop", replayed=False,
                             digest_after="sha256:aa", manifest_digest="sha256:m", generation=3, now=NOW)
    assert done["phase"] == "Failed"
    by_type = {c["type"]: c for c in done["conditions"]}
    assert by_type["Failed"]["reason"] == reason and by_type["Reconciled"]["reason"] == "Unchanged"
    assert by_type["JobRunning"]["reason"] == reason


def test_status_replay_and_skip_and_drift() -> None:
    replay = status.reconciled({"jobResult": "Succeeded"}, action="replayed-and-reconciled", replayed=True,
                               digest_after="sha256:cc", manifest_digest=None, generation=1, now=NOW)
    assert builders.condition_of(replay, "Reconciled")["reason"] == "JournalReplayed"
    # an earlier run committed, then the operator died before writing status: still a change
    resumed = status.reconciled({"jobResult": "Succeeded", "overlayDigestBefore": "sha256:aa"}, action="noop",
                                replayed=False, digest_after="sha256:bb", manifest_digest=None, generation=1, now=NOW)
    assert builders.condition_of(resumed, "Reconciled")["reason"] == "OverlayChanged"
    skipped = status.reconciled({"jobResult": "Cancelled"}, action="", replayed=False, digest_after=None,
                                manifest_digest=None, generation=1, now=NOW, skipped=True)
    assert "lastReconcileTime" not in skipped and builders.condition_of(skipped, "Reconciled")["status"] == "False"
    drift = status.drift({}, state="modified", recorded="sha256:aa", actual=None, generation=1, now=NOW)
    assert drift["conditions"][0]["status"] == "True" and drift["conditions"][0]["reason"] == "OverlayDrift"
    clean = status.drift({}, state="clean", recorded="sha256:aa", actual="sha256:aa", generation=1, now=NOW)
    assert clean["conditions"][0]["status"] == "False" and clean["conditions"][0]["reason"] == "InSync"


def test_operator_config_from_env() -> None:
    config = from_env({"SIFOVERLAY_VOLUME_ROOTS": "hostPath:/data=/mnt/data, pvc:ns/c=/mnt/c",
                       "POD_NAMESPACE": "sifoverlay-system", "SIFOVERLAY_FUSE_ACCESS": "hostPath",
                       "SIFOVERLAY_USER_NAMESPACES": "true", "SIFOVERLAY_RECHECK_SECONDS": "2.5"})
    assert config.volume_roots == {"hostPath:/data": "/mnt/data", "pvc:ns/c": "/mnt/c"}
    in_data = builders.image_ref({"image": {"hostPath": {"path": "/data"}, "path": "x/a.sif"}}, "ns")
    elsewhere = builders.image_ref({"image": {"hostPath": {"path": "/other"}, "path": "a.sif"}}, "ns")
    assert config.journal_for(in_data) == "/mnt/data/.sifoverlay-journal"  # travels with the images
    assert config.journal_for(elsewhere) is None
    assert from_env({"SIFOVERLAY_JOURNAL_DIR": "/j"}).journal_for(elsewhere) == "/j"
    assert config.lease_namespace == "sifoverlay-system" and config.recheck_seconds == 2.5
    assert config.pod_policy.fuse_access == "hostPath" and config.pod_policy.user_namespaces is True
    assert from_env({}).pod_policy == PodPolicy()
    with pytest.raises(UsageError, match="SIFOVERLAY_FUSE_ACCESS='root' is not devicePlugin"):
        from_env({"SIFOVERLAY_FUSE_ACCESS": "root"})
    with pytest.raises(UsageError, match="is not hostPath:/DIR=/LOCAL"):
        parse_volume_roots("data=/mnt")


# --- least privilege: the policy, the fd-based resolution, the summary conditions ------------------
def test_template_subset_reaches_the_pod_and_binds_mounts_into_the_rootfs() -> None:
    template = {"spec": {
        "containers": [{"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
                                         {"name": "scratch", "mountPath": "/scratch"}],
                        "resources": {"limits": {"memory": "1Gi"}}}],
        "volumes": [{"name": "cfg", "configMap": {"name": "app"}}, {"name": "scratch", "emptyDir": {}}],
        "tolerations": [{"key": "gpu", "operator": "Exists"}], "affinity": {"nodeAffinity": {}},
        "nodeSelector": {"zone": "a"}, "runtimeClassName": "kata", "priorityClassName": "low"}}
    job = builders.workload_job(with_spec(workload={"command": ["run"], "template": template}), policy=allowed())
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # the user's volumes are staged below /sifoverlay/user in the runner (never over its own
    # files) and bound into the rootfs where the user wants them
    assert container["command"][10:15] == ["--user=65534:65534", "--bind=/sifoverlay/user/cfg:/etc/app:ro",
                                           "--bind=/sifoverlay/user/scratch:/scratch", "/sifoverlay/image/ml/app.sif", "--"]
    assert container["env"] == [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                                {"name": "SIFOVERLAY_STATE_DIR", "value": "/sifoverlay/image/.sifoverlay-state"}]
    assert container["volumeMounts"][2:] == [{"name": "cfg", "mountPath": "/sifoverlay/user/cfg", "readOnly": True},
                                             {"name": "scratch", "mountPath": "/sifoverlay/user/scratch"}]
    assert container["resources"] == {"limits": {"memory": "1Gi", "smarter-devices/fuse": "1"},
                                      "requests": {"smarter-devices/fuse": "1"}}
    assert pod["volumes"][2:] == template["spec"]["volumes"]
    assert {k: pod[k] for k in builders.TEMPLATE_POD_FIELDS} == {k: template["spec"][k] for k in builders.TEMPLATE_POD_FIELDS}
    assert container["image"] == PodPolicy().operator_image and pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("change, reason, text", [
    ({"image": {"hostPath": {"path": "/data"}, "path": "a.sif"}}, "ImageVolumeNotAllowed", "rule imageVolumes: hostPath /data"),
    ({"image": {"persistentVolumeClaim": {"claimName": "data"}, "path": "a.sif"}}, None, ""),
    ({"workload": {"command": ["x"], "image": "my/own:1"}}, "RunnerImageNotAllowed", "rule runnerImage"),
    ({"workload": {"command": ["x"], "runAsUser": 0}}, "UserNotAllowed", "rule runAsUser: uid 0"),
    ({"workload": {"command": ["x"], "runAsUser": 1000, "runAsGroup": 0}}, "UserNotAllowed", "rule runAsGroup: gid 0"),
    ({"workload": {"command": ["x"], "env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}}, "EnvNotAllowed",
     "rule workloadEnv: environment variable 'LD_PRELOAD'"),
    ({"workload": {"command": ["x"], "template": {"spec": {"containers": [{"env": [
        {"name": "PATH", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "p"}}}]}]}}}}, "EnvNotAllowed",
     "rule workloadEnv: environment variable 'PATH'"),
])
def test_policy_refusals_name_the_rule(change: dict, reason: str | None, text: str) -> None:
    from sifoverlay.k8s.policy import PolicyViolation

    if reason is None:
        builders.workload_job(with_spec(**change), policy=allowed())  # team-a's PVC rule
        with pytest.raises(PolicyViolation, match="PVC data is not an image volume allowed in namespace team-b"):
            body = with_spec(**change)
            body["metadata"]["namespace"] = "team-b"
            builders.workload_job(body, policy=allowed())
        return
    with pytest.raises(PolicyViolation) as err:
        builders.workload_job(with_spec(**change), policy=allowed())
    assert err.value.reason == reason and text in str(err.value)


def test_policy_from_json_fails_closed_and_rejects_bad_rules() -> None:
    from sifoverlay.k8s import policy

    assert policy.from_json("") == policy.AdminPolicy() and policy.AdminPolicy().image_volumes == ()
    for bad, text in (('{"imageVolumes": [{"name": "x", "hostPathPrefix": "/"}]}', "must be an absolute, normalised"),
                      ('{"imageVolumes": [{"name": "x", "hostPathPrefix": "/a/../b"}]}', "must be an absolute, normalised"),
                      ('{"imageVolumes": [{"name": "x"}]}', "needs hostPathPrefix or persistentVolumeClaim"),
                      ("{", "is not JSON")):
        with pytest.raises(UsageError, match=text):
            policy.from_json(bad)


def test_local_parts_maps_a_hostpath_below_a_mounted_root() -> None:
    roots = {"hostPath:/data/images": "/volumes/images", "pvc:team-a/data": "/volumes/data"}
    ref = builders.image_ref({"image": {"hostPath": {"path": "/data/images/team-a"}, "path": "x/a.sif"}}, "team-a")
    assert ref.local_parts(roots) == ("/volumes/images", "team-a/x/a.sif")
    assert ref.local_path(roots) == "/volumes/images/team-a/x/a.sif"
    sibling = builders.image_ref({"image": {"hostPath": {"path": "/data/images2"}, "path": "a.sif"}}, "team-a")
    assert sibling.local_parts(roots) is None
    pvc = builders.image_ref({"image": {"persistentVolumeClaim": {"claimName": "data"}, "path": "a.sif"}}, "team-a")
    assert pvc.local_parts(roots) == ("/volumes/data", "a.sif")


def test_safepath_resolves_beneath_the_root_and_refuses_symlinks(tmp_path: Path) -> None:
    import os

    from sifoverlay.k8s import safepath

    (tmp_path / "a" / "b").mkdir(parents=True)
    image = tmp_path / "a" / "b" / "x.sif"
    image.write_bytes(b"sif")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.sif").write_bytes(b"other")
    (tmp_path / "a" / "link").symlink_to("../elsewhere")
    (tmp_path / "a" / "flink.sif").symlink_to("../elsewhere/y.sif")
    os.mkfifo(tmp_path / "a" / "fifo.sif")
    found = safepath.resolve_image(str(tmp_path), "a/b/x.sif", what="t")
    st = os.stat(image)
    assert (found.path, found.identity, found.fd) == (str(image), (st.st_dev, st.st_ino), -1)
    kept = safepath.resolve_image(str(tmp_path), "a/b/x.sif", what="t", keep_open=True)
    try:
        assert os.fstat(kept.fd).st_ino == st.st_ino
    finally:
        os.close(kept.fd)
    for path, text in (("a/link/y.sif", "a directory on the way is a symlink"), ("a/flink.sif", "is a symlink or not a regular file"),
                       ("a/fifo.sif", "is a symlink or not a regular file"), ("a/../elsewhere/y.sif", "not a normalised relative path"),
                       ("/etc/passwd", "not a normalised relative path"), ("a//b/x.sif", "not a normalised relative path")):
        with pytest.raises(safepath.UnsafePath, match=text):
            safepath.resolve_image(str(tmp_path), path, what="t")
    os.chmod(tmp_path / "a" / "b", 0o755)
    assert safepath.resolve_image(str(tmp_path), "a/b/x.sif", what="t").dir_private is (os.getuid() == 0)
    os.chmod(tmp_path / "a" / "b", 0o1777)
    assert safepath.resolve_image(str(tmp_path), "a/b/x.sif", what="t").dir_private is False


@pytest.mark.parametrize("phase, ready, failed, stalled, reconciled", [
    ("Running", ("False", "Running"), ("False", "Running"), None, ("False", "Running")),
    ("Succeeded", ("True", "Succeeded"), ("False", "Succeeded"), None, ("False", "Succeeded")),
    ("Failed", ("False", "Failed"), ("True", "InvalidSpec"), ("True", "InvalidSpec"), ("False", "Failed")),
])
def test_summary_conditions(phase: str, ready: tuple, failed: tuple, stalled: tuple | None,
                            reconciled: tuple) -> None:
    base = status.failed({}, reason="InvalidSpec", message="bad", generation=3, now=NOW) if phase == "Failed" else \
        {"phase": phase, "conditions": [{"type": "Stalled", "status": "True", "reason": "Old", "message": "",
                                         "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    out = status.summarize({}, base, generation=3, now=NOW)
    by_type = {c["type"]: c for c in out["conditions"]}
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ready
    assert (by_type["Complete"]["status"], by_type["Complete"]["reason"]) == ready
    assert (by_type["Failed"]["status"], by_type["Failed"]["reason"]) == failed
    assert ((by_type["Stalled"]["status"], by_type["Stalled"]["reason"]) if "Stalled" in by_type else None) == stalled
    assert (by_type["Reconciled"]["status"], by_type["Reconciled"]["reason"]) == reconciled
    # kstatus: InProgress (Reconciling=True) only while not finished
    assert ((by_type["Reconciling"]["status"], by_type["Reconciling"]["reason"]) if "Reconciling" in by_type
            else None) == (("True", "Running") if phase == "Running" else None)
    assert out["observedGeneration"] == 3 and all(c["observedGeneration"] == 3 for c in out["conditions"]
                                                  if c["type"] != "Stalled" or stalled)
    assert [c["type"] for c in out["conditions"]][:2] == ["Ready", "Complete"]


def test_summary_keeps_the_reconcile_result_and_follows_the_phase_until_then() -> None:
    """Reconciled is False with the phase as reason from the first status write on (so
    `kubectl wait --for=condition=Reconciled` has something to watch), and once the
    reconcile set it, later writes (drift checks, the terminal phase) keep its verdict."""
    running = status.summarize({}, {"phase": "Running", "conditions": []}, generation=1, now=NOW)
    reconciling = status.summarize(running, status.job_ended(running, result="Succeeded", message="done",
                                                             generation=1, now=NOW), generation=1, now=NOW)
    assert builders.condition_of(reconciling, "Reconciled")["reason"] == "Reconciling"
    assert builders.condition_of(reconciling, "Reconciling")["reason"] == "InProgress"  # the step's own reason
    done = status.reconciled({**reconciling, "jobResult": "Succeeded", "overlayDigestBefore": "sha256:aa"},
                             action="reconciled", replayed=False, digest_after="sha256:bb", manifest_digest=None,
                             generation=1, now=LATER)
    out = status.summarize(reconciling, done, generation=1, now=LATER)
    rec = builders.condition_of(out, "Reconciled")
    assert (rec["status"], rec["reason"], rec["lastTransitionTime"]) == ("True", "OverlayChanged", "2026-11-28T09:35:15Z")
    assert builders.condition_of(out, "Reconciling")["status"] == "False"
    # a resource that fails while Waiting (Reconciling=True, "Waiting") is not left InProgress
    waiting = status.summarize({}, {"phase": "Waiting", "conditions": []}, generation=1, now=NOW)
    assert builders.condition_of(waiting, "Reconciling")["reason"] == "Waiting"
    gave_up = status.summarize(waiting, status.failed(waiting, reason="InvalidImage", message="bad", generation=1,
                                                      now=NOW), generation=1, now=NOW)
    assert (builders.condition_of(gave_up, "Reconciling")["status"], builders.condition_of(gave_up, "Stalled")["status"]) \
        == ("False", "True")
    drifted = status.summarize(out, status.drift(out, state="modified", recorded="sha256:bb", actual=None,
                                                 generation=2, now=LATER), generation=2, now=LATER)
    rec = builders.condition_of(drifted, "Reconciled")
    assert (rec["status"], rec["reason"], rec["observedGeneration"]) == ("True", "OverlayChanged", 2)


def test_lock_table_is_pruned_when_free() -> None:
    import threading

    from sifoverlay.k8s.controller import Controller
    from sifoverlay.k8s.config import OperatorConfig

    ctl = Controller(None, OperatorConfig())  # type: ignore[arg-type]
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ctl._lock("ns", "a"):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(5)
    assert ctl.lock_table_size() == 1
    release.set()
    t.join(5)
    for i in range(100):  # a resource seen once does not stay in the table
        with ctl._lock("ns", f"r{i}"):
            assert ctl.lock_table_size() == 1
    assert ctl.lock_table_size() == 0


def test_phase_age_and_stale_lease_metrics() -> None:
    from sifoverlay.k8s import metrics

    def value(name: str, **labels: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(name, labels)

    metrics.observe_phase("m", "a", "Waiting", 100.0)
    metrics.observe_phase("m", "b", "Waiting", 50.0)
    metrics.observe_phase("m", "a", "Waiting", 300.0)  # still waiting: keeps when it entered
    assert value("sifoverlay_operator_phase_oldest_timestamp_seconds", phase="Waiting") == 50.0
    metrics.observe_phase("m", "b", "Running", 400.0)
    assert value("sifoverlay_operator_phase_oldest_timestamp_seconds", phase="Waiting") == 100.0
    metrics.observe_phase("m", "a", "Succeeded", 500.0)
    assert value("sifoverlay_operator_phase_oldest_timestamp_seconds", phase="Waiting") is None  # nobody waits
    metrics.set_lease_after_finish("m", "c", True)
    assert value("sifoverlay_operator_leases_held_after_finish") == 1.0
    metrics.forget("m", "c")
    metrics.forget("m", "b")
    assert value("sifoverlay_operator_leases_held_after_finish") == 0.0
    assert value("sifoverlay_operator_phase_oldest_timestamp_seconds", phase="Running") is None
