"""Attacks on the operator by someone allowed to create OverlayJobs, against the real
operator (kopf) and real images. Each is refused with a status condition naming the rule
(or the unsafe path), and nothing is touched. The rules the admission policy can judge
are refused at admission too: tests/k8s/test_k8s_admission.py runs the chart's CEL on the
same kinds of objects. What admission cannot see (the filesystem: symlinks, scratch
files) only the operator refuses, through file descriptors resolved beneath the volume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sifoverlay import engine
from sifoverlay.engine import sessions
from tests.conftest import require_tool
from tests.k8s.conftest import HOST_DIR, POLICY, Cluster, Site, kopf_runner, overlay_sha256, wait_for, write_into_overlay

pytestmark = pytest.mark.k8s


def refused(cluster: Cluster, name: str, reason: str) -> dict[str, Any]:
    cluster.wait_phase(name, "Failed")
    failed = cluster.condition(name, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", reason), failed
    stalled = cluster.condition(name, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", reason)  # kstatus: Failed
    assert cluster.condition(name, "Ready")["status"] == "False"
    assert cluster.job(f"{name}-run") is None and cluster.lease_holders() == []
    events = wait_for("the refusal event", lambda: [e for e in cluster.kube.core.list_namespaced_event(cluster.ns).items
                                                    if e.involved_object.name == name and e.reason == reason])
    assert events[0].type == "Warning"
    return failed


def test_attack_hostpath_outside_the_policy(site: Site, cluster: Cluster, operator: object) -> None:
    """hostPath: /etc (or /): with a user-chosen image that would own the node."""
    cluster.create_overlayjob("etc", relpath="shadow", image={"hostPath": {"path": "/etc"}, "path": "shadow"})
    failed = refused(cluster, "etc", "ImageVolumeNotAllowed")
    assert failed["message"] == (
        f"OverlayJob {cluster.ns}/etc: rule imageVolumes: hostPath /etc is not an image volume allowed in namespace "
        f"{cluster.ns} (allowed: shared-images (hostPath /data/images/...; all namespaces); "
        "data-claims (PVC data; all namespaces))")
    # a path that climbs out of an allowed prefix is refused by the same rule
    cluster.create_overlayjob("climb", image={"hostPath": {"path": f"{HOST_DIR}/../../etc"}, "path": "passwd"})
    assert "must be an absolute path without '.', '..' or empty segments" in refused(
        cluster, "climb", "ImageVolumeNotAllowed")["message"]


def test_attack_user_chosen_runner_image(site: Site, cluster: Cluster, vectors: Path, operator: object) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("rootkit", workload={"image": "evil.example/rootkit:1", "command": ["sh"]})
    failed = refused(cluster, "rootkit", "RunnerImageNotAllowed")
    assert "rule runnerImage: the overlay is mounted by the operator's runner image ghcr.io/sifoverlay/operator:0.1.0" \
        in failed["message"]
    assert sessions.open_sessions(site.journal) == []


def test_attack_root_uid_and_host_volumes_in_the_template(site: Site, cluster: Cluster, vectors: Path,
                                                          operator: object) -> None:
    site.make_image(vectors)
    cluster.create_overlayjob("lowuid", workload={"command": ["id"], "runAsUser": 999})
    assert "rule runAsUser: uid 999 is outside 1000..65534 (never 0)" in refused(cluster, "lowuid", "UserNotAllowed")["message"]
    template = {"spec": {"containers": [{"volumeMounts": [{"name": "host", "mountPath": "/host"}]}],
                         "volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}
    cluster.create_overlayjob("hostvol", workload={"command": ["ls", "/host"], "template": template})
    assert "rule workloadVolumes: volume 'host' (hostPath) is not allowed" in refused(
        cluster, "hostvol", "VolumeNotAllowed")["message"]


@pytest.fixture
def team_policy(site: Site, monkeypatch: pytest.MonkeyPatch) -> str:
    """Per-namespace image volumes: this namespace may use only /data/images/<ns>; another
    team's images live beside it, in the same hostPath the operator mounts."""
    own = f"{HOST_DIR}/{site.namespace}"
    monkeypatch.setenv("SIFOVERLAY_POLICY", json.dumps({**POLICY, "imageVolumes": [
        {"name": "own-team", "hostPathPrefix": own, "namespaces": [site.namespace]}]}))
    (site.volume / site.namespace).mkdir()
    return own


def test_attack_symlinked_directory_into_another_teams_images(site: Site, cluster: Cluster, vectors: Path,
                                                               team_policy: str) -> None:
    victim = site.make_image(vectors, "other-team/app.sif")
    victim_digest = overlay_sha256(victim)
    own = site.volume / site.namespace
    (own / "link").symlink_to("../other-team")  # planted from a workload: the volume is shared
    (own / "app.sif").symlink_to("../other-team/app.sif")
    with kopf_runner():
        cluster.create_overlayjob("viadir", image={"hostPath": {"path": team_policy}, "path": "link/app.sif"})
        cluster.create_overlayjob("viafile", image={"hostPath": {"path": team_policy}, "path": "app.sif"})
        by_dir = refused(cluster, "viadir", "UnsafeImagePath")
        by_file = refused(cluster, "viafile", "UnsafeImagePath")
    assert f"'{site.namespace}/link/app.sif': a directory on the way is a symlink or not a directory; refused" \
        in by_dir["message"]
    assert f"'{site.namespace}/app.sif' is a symlink or not a regular file; refused" in by_file["message"]
    # the other team's image: not opened for writing, no session, no lease, same bytes
    assert sessions.open_sessions(site.journal) == [] and overlay_sha256(victim) == victim_digest
    assert engine.status(victim, journal_dir=str(site.journal)).recorded_digest == victim_digest


def test_attack_symlink_swapped_in_while_the_job_runs(site: Site, cluster: Cluster, vectors: Path,
                                                      team_policy: str) -> None:
    """The directory is real when the job starts and a symlink to another team's images
    when it ends: the reconcile (an fd resolved beneath the root, handed to the engine)
    refuses it and retries; once the directory is back, it reconciles the right image."""
    own = site.volume / site.namespace
    mine = site.make_image(vectors, f"{site.namespace}/team/app.sif")
    victim = site.make_image(vectors, "other-team/team/app.sif")
    mine_before, victim_before = overlay_sha256(mine), overlay_sha256(victim)
    write_into_overlay(victim, "victim.txt", b"not yours\n", site.work)  # unreconciled change of the victim
    victim_dirty = overlay_sha256(victim)
    with kopf_runner():
        cluster.create_overlayjob("swap", image={"hostPath": {"path": team_policy}, "path": "team/app.sif"})
        pod = cluster.start_pod(cluster.wait_job("swap-run"))
        write_into_overlay(mine, "mine.txt", b"mine\n", site.work)
        os.rename(own / "team", own / "team.real")
        (own / "team").symlink_to("../other-team/team")
        cluster.pod_phase(pod, "Succeeded")
        cluster.finish_job("swap-run", "Complete")
        error = wait_for("reconcile refused", lambda: (c := cluster.condition("swap", "Reconciling")).get("reason")
                         == "ReconcileError" and c)
        assert f"'{site.namespace}/team/app.sif': a directory on the way is a symlink or not a directory; refused" \
            in error["message"]
        assert cluster.status("swap")["phase"] == "Reconciling"
        # the victim's manifest was not touched: its change is still unreconciled
        assert engine.status(victim, journal_dir=str(site.journal)).recorded_digest == victim_before != victim_dirty
        (own / "team").unlink()
        os.rename(own / "team.real", own / "team")
        done = cluster.wait_phase("swap", "Succeeded")
    assert done["overlayDigestBefore"] == mine_before and done["overlayDigestAfter"] == overlay_sha256(mine)
    assert engine.status(victim, journal_dir=str(site.journal)).recorded_digest == victim_before


def test_attack_swapped_scratch_file_of_the_seal(site: Site, cluster: Cluster, vectors: Path, operator: object) -> None:
    """The seal stages its squashfs in a scratch file and copies it into the image. The
    image's directory belongs to users (world-writable here): a scratch file there, of a
    predictable name, could be swapped between the hash and the copy. It is not there:
    the engine stages in its own root-owned state directory under a random name, and the
    seal works on the image's fd. What an attacker planted at the old predictable names
    is never read, and the sealed layer is exactly the bytes its digest names."""
    from sifoverlay.ocisif import open_image

    require_tool("mksquashfs")
    image = site.make_image(vectors, "shared/app.sif")
    os.chmod(image.parent, 0o1777)  # a shared, world-writable images directory
    host = "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"
    planted = [image.parent / f".app.sif.sifoverlay-tmp-{host}-{os.getpid()}.sqfs", image.parent / "app.sif.sqfs"]
    for path in planted:
        path.write_bytes(b"attacker's squashfs")
    cluster.create_overlayjob("seal", relpath="shared/app.sif", policy={"sealOnSuccess": True})
    pod = cluster.start_pod(cluster.wait_job("seal-run"))
    write_into_overlay(image, "result.txt", b"result\n", site.work)
    cluster.pod_phase(pod, "Succeeded")
    cluster.finish_job("seal-run", "Complete")
    done = cluster.wait_phase("seal", "Succeeded")
    assert done["sealed"] is True
    assert (cluster.condition("seal", "Sealed")["status"], cluster.condition("seal", "Sealed")["reason"]) == ("True", "Sealed")
    assert all(p.read_bytes() == b"attacker's squashfs" for p in planted)
    scratch = Path(site.env()["SIFOVERLAY_STATE_DIR"]) / "scratch"
    assert scratch.is_dir() and (scratch.stat().st_mode & 0o077) == 0 and list(scratch.iterdir()) == []
    with open_image(image) as img:
        assert img.overlay is None  # sealed: the ext3 became a read-only squashfs layer
        img.verify_layers()  # every layer, the new one included, is the bytes its digest names


def swap_in(own: Path, other: Path) -> None:
    """The attacker's move between the operator's resolution and its engine call: its own
    `team` directory is renamed away and the other team's real `team` directory (no
    symlink anywhere) takes its name."""
    os.rename(own / "team", own / "team.real")
    os.rename(other / "team", own / "team")


def swap_back(own: Path, other: Path) -> None:
    os.rename(own / "team", other / "team")
    os.rename(own / "team.real", own / "team")


def test_attack_directory_swapped_under_the_drift_check(site: Site, cluster: Cluster, vectors: Path,
                                                        team_policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drift check reads the image through the descriptor it resolved, not the path:
    a real directory renamed into place right after the resolution (the race window of a
    path-based check) makes it read nothing of the other team's image."""
    import kubernetes

    from sifoverlay.k8s import reconcile, safepath
    from sifoverlay.k8s.config import from_env
    from sifoverlay.k8s.controller import Controller
    from sifoverlay.k8s.kubeapi import KubeApi

    own, other = site.volume / site.namespace, site.volume / "other-team"
    site.make_image(vectors, f"{site.namespace}/team/app.sif")
    victim = site.make_image(vectors, "other-team/team/app.sif")
    write_into_overlay(victim, "victim.txt", b"unreconciled\n", site.work)
    assert engine.status(victim, journal_dir=str(site.journal)).state == "modified"
    ctl = Controller(KubeApi(kubernetes.client.ApiClient()), from_env())
    cluster.create_overlayjob("drifty", image={"hostPath": {"path": team_policy}, "path": "team/app.sif"})
    ctl.start(cluster.get("drifty"))
    cluster.finish_job("drifty-run", "Complete")
    ctl.workload_ended(cluster.ns, "drifty", "Succeeded", "Job completed")
    assert cluster.status("drifty")["phase"] == "Succeeded"
    real_resolve, real_drift, swaps = safepath.resolve_image, reconcile.drift, []

    def resolve_then_swap(*args: Any, **kwargs: Any) -> Any:
        resolved = real_resolve(*args, **kwargs)
        swap_in(own, other)
        swaps.append(resolved.path)
        return resolved

    def drift_then_swap_back(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_drift(*args, **kwargs)
        finally:
            swap_back(own, other)

    monkeypatch.setattr(safepath, "resolve_image", resolve_then_swap)
    monkeypatch.setattr(reconcile, "drift", drift_then_swap_back)
    ctl.check_drift(cluster.get("drifty"))
    assert swaps == [str(own / "team" / "app.sif")]  # the check ran, with the victim at that path
    drift = cluster.condition("drifty", "DriftDetected")
    assert (drift["status"], drift["reason"]) == ("False", "InSync"), drift  # its own image: clean
    assert engine.status(victim, journal_dir=str(site.journal)).state == "modified"


def test_attack_directory_swapped_under_the_recovery(site: Site, cluster: Cluster, vectors: Path,
                                                     team_policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay of an interrupted commit (engine.recover, when the sync asks for it) and
    the manifest digest the status reports work on the resolved descriptor: with the other
    team's directory renamed into place, the other team's own interrupted commit stays
    pending (its owner's recovery, not ours) and our image is the one reconciled."""
    import subprocess
    import sys

    from sifoverlay.engine import statedir
    from sifoverlay.engine.journal import Journal
    from sifoverlay.engine.leasefile import lease_path
    from sifoverlay.errors import RecoveryNeeded
    from sifoverlay.k8s import reconcile, safepath
    from tests.k8s.conftest import manifest_digest
    from tests.k8s.test_k8s_crash import crash_points

    own, other = site.volume / site.namespace, site.volume / "other-team"
    mine = site.make_image(vectors, f"{site.namespace}/team/app.sif")
    victim = site.make_image(vectors, "other-team/team/app.sif")
    write_into_overlay(victim, "victim.txt", b"theirs\n", site.work)
    crash_at = crash_points(victim, site.work, "their-job")["before-append"]
    killed = subprocess.run([sys.executable, "-c", (
        "import sys; from sifoverlay import engine; from sifoverlay.fsio import CountingIO; "
        "engine.sync(sys.argv[1], job='their-job', journal_dir=sys.argv[2], io=CountingIO(int(sys.argv[3]), mode='kill'))"),
        str(victim), str(site.journal), str(crash_at)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    # the dead writer's lease record: gone, as when its lease expired long ago (otherwise a
    # recovery of the victim would find it busy and not touch it anyway)
    os.unlink(lease_path(str(victim)))
    victim_key = statedir.key_of_path(str(victim))
    assert len(Journal(str(site.journal)).pending(key=victim_key)) == 1
    victim_bytes = victim.read_bytes()
    write_into_overlay(mine, "mine.txt", b"mine\n", site.work)
    mine_after = overlay_sha256(mine)
    resolved = safepath.resolve_image(str(site.volume), f"{site.namespace}/team/app.sif", what="t", keep_open=True)
    swap_in(own, other)
    real_sync, asked = engine.sync, []

    def sync_asking_for_recovery(*args: Any, **kwargs: Any) -> Any:
        if not asked:
            asked.append(kwargs.get("image_fd"))
            raise RecoveryNeeded(str(args[0]), "simulated: an entry the inline recovery left")
        return real_sync(*args, **kwargs)

    monkeypatch.setattr(engine, "sync", sync_asking_for_recovery)
    try:
        outcome = reconcile.run(resolved.path, job_id="k8s-mine", journal_dir=str(site.journal), seal=False,
                                image_fd=resolved.fd, expect_identity=resolved.identity)
    finally:
        os.close(resolved.fd)
        swap_back(own, other)
    # the other team's interrupted commit: still pending, its image not written
    assert len(Journal(str(site.journal)).pending(key=victim_key)) == 1 and victim.read_bytes() == victim_bytes
    assert asked == [resolved.fd] and outcome.action == "reconciled" and outcome.digest_after == mine_after
    assert outcome.manifest_digest == manifest_digest(mine) != manifest_digest(victim)


@pytest.mark.parametrize("which, planted", [(".sifoverlay-state", "user-owned"), (".sifoverlay-state", "world-writable"),
                                            (".sifoverlay-state", "symlink"), (".sifoverlay-journal", "symlink"),
                                            (".sifoverlay-journal", "user-owned")])
def test_attack_planted_state_directory_on_the_volume(site: Site, cluster: Cluster, vectors: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, which: str, planted: str) -> None:
    """The engine's state directory on an image volume (`.sifoverlay-state`: lease records,
    scratch) is root's. A user who writes into the shared volume from a workload may have
    created it first (owned by the user, or root-owned but world-writable), or planted a
    symlink to a directory of its own: the operator refuses the resource before anything
    runs (condition UnsafeStateDirectory) and creates nothing in it or through it. The
    same for the journal on the volume (`.sifoverlay-journal`)."""
    monkeypatch.delenv("SIFOVERLAY_STATE_DIR")  # the defaults: both directories on the image's volume
    monkeypatch.delenv("SIFOVERLAY_JOURNAL_DIR")
    site.make_image(vectors)
    state = site.volume / which
    target = state
    if planted == "symlink":
        target = tmp_path / "attacker-state"
        target.mkdir()
        os.chown(target, 1000, 1000)
        state.symlink_to(target)
    else:
        state.mkdir()
        if planted == "user-owned":
            os.chown(state, 1000, 1000)
        else:
            os.chmod(state, 0o777)
    with kopf_runner():
        cluster.create_overlayjob("planted")
        failed = refused(cluster, "planted", "UnsafeStateDirectory")
    why = {"user-owned": "is not root-owned and private (owner uid 1000, mode 755)",
           "world-writable": "is not root-owned and private (owner uid 0, mode 777)",
           "symlink": "Not a directory"}[planted]  # O_NOFOLLOW|O_DIRECTORY on the link itself
    assert failed["message"].startswith(f"OverlayJob {cluster.ns}/planted: engine directory {state}: ") and \
        why in failed["message"] and failed["message"].endswith("; refused"), failed["message"]
    assert list(target.iterdir()) == [] and sessions.open_sessions(site.journal) == []
    assert state.is_symlink() == (planted == "symlink")  # not replaced either: the admin decides


def test_the_state_directory_on_the_volume_is_created_root_owned_and_used(site: Site, cluster: Cluster,
                                                                          vectors: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a planted one, the operator creates `.sifoverlay-state` itself (root, 0755:
    lease records readable, writable by root only) and the job runs on it."""
    monkeypatch.delenv("SIFOVERLAY_STATE_DIR")
    image = site.make_image(vectors)
    state = site.volume / ".sifoverlay-state"
    with kopf_runner():
        cluster.create_overlayjob("fresh")
        pod = cluster.start_pod(cluster.wait_job("fresh-run"))
        write_into_overlay(image, "f.txt", b"f\n", site.work)
        cluster.pod_phase(pod, "Succeeded")
        cluster.finish_job("fresh-run", "Complete")
        done = cluster.wait_phase("fresh", "Succeeded")
    st = os.lstat(state)
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755) and (state / "leases").is_dir()
    assert done["overlayDigestAfter"] == overlay_sha256(image)
