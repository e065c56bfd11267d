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
