"""The pure builders and status transitions, against exact dicts (no server)."""

from __future__ import annotations

import copy
import datetime as dt

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.k8s import builders, names, status
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.builders import PodPolicy
from sifoverlay.k8s.config import from_env, parse_volume_roots

NOW = dt.datetime(2026, 11, 28, 9, 30, 15, 123456, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
UID = "0123456789abcdef-uid"
BODY = {
    "apiVersion": "sifoverlay.dev/v1alpha1",
    "kind": "OverlayJob",
    "metadata": {"name": "train", "namespace": "team-a", "uid": UID, "generation": 2},
    "spec": {
        "image": {"hostPath": {"path": "/data/images"}, "path": "ml/app.sif"},
        "workload": {"image": "ghcr.io/x/runner:1", "command": ["python", "train.py"],
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
    assert builders.workload_job(BODY, policy=PodPolicy()) == {
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
                        "image": "ghcr.io/x/runner:1",
                        "command": ["sifoverlay", "exec", "--writable", "--mount", "fuse",
                                    "--job-id", "k8s-team-a-train-01234567",
                                    "--journal-dir", "/sifoverlay/image/.sifoverlay-journal",
                                    "/sifoverlay/image/ml/app.sif", "--", "python", "train.py"],
                        "env": [{"name": "A", "value": "1"}],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
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
                },
            },
        },
    }


def test_workload_job_host_path_fuse_device_and_user_namespaces() -> None:
    policy = PodPolicy(fuse_access="hostPath", user_namespaces=True, apparmor_unconfined=False)
    pod = builders.workload_job(BODY, policy=policy)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostUsers"] is False
    assert pod["volumes"][-1] == {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}}
    assert container["volumeMounts"][-1] == {"name": "fuse", "mountPath": "/dev/fuse"}
    assert container["resources"] == {"limits": {"cpu": "2"}}  # no device-plugin resource
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                                            "seccompProfile": {"type": "RuntimeDefault"}}


def test_read_only_mode_runs_exec_without_writable() -> None:
    container = builders.workload_job(with_spec(mode="ro"), policy=PodPolicy())["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["sifoverlay", "exec", "--mount"]
    assert container["command"][8:10] == ["/sifoverlay/image/ml/app.sif", "--"]
    # the volume stays writable: a reader takes a shared lease file beside the image
    assert container["volumeMounts"][0] == {"name": "image", "mountPath": "/sifoverlay/image"}


def test_kernel_mounts_need_operator_opt_in_and_are_privileged() -> None:
    with pytest.raises(UsageError, match="OverlayJob team-a/train: spec.mountMode kernel is disabled"):
        builders.workload_job(with_spec(mountMode="kernel"), policy=PodPolicy())
    job = builders.workload_job(with_spec(mountMode="kernel"), policy=PodPolicy(allow_kernel_mounts=True, user_namespaces=True))
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"] == {"privileged": True}
    assert pod["containers"][0]["command"][2:5] == ["--writable", "--mount", "kernel"]
    assert "hostUsers" not in pod  # a privileged pod cannot use a user namespace
    assert pod["containers"][0]["resources"] == {"limits": {"cpu": "2"}}


def test_pvc_image_and_reconcile_job() -> None:
    body = with_spec(image={"persistentVolumeClaim": {"claimName": "data"}, "path": "app.sif"})
    ref = builders.image_ref(body["spec"], "team-a")
    assert ref.identity == "pvc:team-a/data:app.sif"
    assert ref.local_path({"pvc:team-a/data": "/mnt/data"}) == "/mnt/data/app.sif"
    assert ref.local_path({"pvc:team-b/data": "/mnt/data"}) is None
    job = builders.reconcile_job(body, policy=PodPolicy(operator_image="op:1"))
    assert job["metadata"]["name"] == "train-reconcile"
    assert job["metadata"]["labels"][wk.LABEL_ROLE] == "reconcile"
    assert job["spec"]["backoffLimit"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "image", "persistentVolumeClaim": {"claimName": "data"}}]
    assert pod["containers"][0]["image"] == "op:1"
    assert pod["containers"][0]["command"][-2:] == ["/sifoverlay/image/app.sif", "k8s-team-a-train-01234567"]
    assert pod["containers"][0]["env"] == [{"name": "SIFOVERLAY_JOURNAL_DIR", "value": "/sifoverlay/image/.sifoverlay-journal"}]
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
