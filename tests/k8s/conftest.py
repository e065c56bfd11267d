"""Fixtures for the Kubernetes tests.

The API server is kmock (tests/k8s/kmock_server.py) served over HTTP on 127.0.0.1 in a
subprocess: no kube-apiserver exists on these machines. The operator is the real one
(`kopf run operator/main.py`, in-process through KopfRunner or as a subprocess), and
assertions use the official `kubernetes` client on the same kubeconfig. Nothing runs the
Job controller or the kubelet, so the tests play them (class Cluster below): they create
the Job's Pod, move it through its phases, and set the Job's conditions.

Images are real OCI-SIF files (a Go-written golden plus an overlay made by the engine);
the "workload" writes into the overlay's ext3 with debugfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import REPO, engine_base_source, require_tool

T = TypeVar("T")
CRD_FILES = sorted(str(p) for p in (REPO / "charts" / "sifoverlay" / "crds").glob("*.yaml"))
OPERATOR_SCRIPT = str(REPO / "operator" / "main.py")
HOST_DIR = "/data/images"  # the hostPath the OverlayJobs name; the operator sees it at a temp dir
# the admin policy of the tests' operator (chart value `policy`): images only under HOST_DIR
# or on a PVC named "data" (the reconcile-Job tests)
POLICY = {"imageVolumes": [{"name": "shared-images", "hostPathPrefix": HOST_DIR},
                           {"name": "data-claims", "persistentVolumeClaim": "data"}],
          "runAsUser": {"min": 1000, "max": 65534}, "runAsGroup": {"min": 1000, "max": 65534}}
WAIT = float(os.environ.get("SIFOVERLAY_K8S_TEST_WAIT", "60"))  # generous: 2 shared cores
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: tester, user: {{token: not-checked-by-kmock}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: tester}}}}]
current-context: kmock
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --- the API server ---------------------------------------------------------------------------------
@dataclass
class Kube:
    port: int
    kubeconfig: Path
    audit_log: Path

    @property
    def core(self) -> Any:
        import kubernetes
        return kubernetes.client.CoreV1Api()

    @property
    def batch(self) -> Any:
        import kubernetes
        return kubernetes.client.BatchV1Api()

    @property
    def custom(self) -> Any:
        import kubernetes
        return kubernetes.client.CustomObjectsApi()

    @property
    def coordination(self) -> Any:
        import kubernetes
        return kubernetes.client.CoordinationV1Api()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    import kubernetes

    port = free_port()
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    env = {**os.environ, "KMOCK_AUDIT_LOG": str(audit)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("kmock_server.py")), str(port), *CRD_FILES],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "listening" in line, f"kmock did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        config = tmp_path_factory.mktemp("kube") / "config"
        config.write_text(KUBECONFIG.format(port=port))
        os.environ["KUBECONFIG"] = str(config)
        # kubernetes reads $KUBECONFIG when imported; kopf's login goes through that default
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(config)
        kubernetes.config.load_kube_config(str(config))
        kubernetes.client.CoreV1Api().create_namespace({"metadata": {"name": "default"}})
        yield Kube(port, config, audit)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace per test; afterwards its objects are removed as an admin would
    (finalizers stripped), so a later operator run does not resume them."""
    name = f"t-{secrets.token_hex(4)}"
    kube.core.create_namespace({"metadata": {"name": name}})
    yield name
    from sifoverlay.k8s import well_known as wk

    for item in kube.custom.list_namespaced_custom_object(wk.GROUP, wk.VERSION, name, wk.PLURAL)["items"]:
        with contextlib.suppress(Exception):
            kube.custom.patch_namespaced_custom_object(wk.GROUP, wk.VERSION, name, wk.PLURAL,
                                                       item["metadata"]["name"], {"metadata": {"finalizers": None}})
            kube.custom.delete_namespaced_custom_object(wk.GROUP, wk.VERSION, name, wk.PLURAL, item["metadata"]["name"])
    for pod in kube.core.list_namespaced_pod(name).items:
        with contextlib.suppress(Exception):
            kube.core.patch_namespaced_pod(pod.metadata.name, name, {"metadata": {"finalizers": None}})
            kube.core.delete_namespaced_pod(pod.metadata.name, name)
    for job in kube.batch.list_namespaced_job(name).items:
        with contextlib.suppress(Exception):
            kube.batch.delete_namespaced_job(job.metadata.name, name)
    for lease in kube.coordination.list_namespaced_lease(name).items:
        with contextlib.suppress(Exception):
            kube.coordination.delete_namespaced_lease(lease.metadata.name, name)


# --- real images ------------------------------------------------------------------------------------
def overlay_region(path: Path) -> tuple[int, int]:
    from sifoverlay.ocisif import open_image

    with open_image(path) as img:
        assert img.overlay is not None
        return img.overlay.offset, img.overlay.size


def overlay_sha256(path: Path) -> str:
    """sha256 of the overlay's ext3 bytes, computed here independently of the engine."""
    offset, size = overlay_region(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = size
        while left:
            chunk = fh.read(min(left, 1 << 22))
            assert chunk, "image shorter than its overlay descriptor"
            digest.update(chunk)
            left -= len(chunk)
    return "sha256:" + digest.hexdigest()


def manifest_digest(path: Path) -> str:
    from sifoverlay.ocisif import open_image

    with open_image(path) as img:
        return str(img.manifest.digest)


def write_into_overlay(path: Path, name: str, content: bytes, work: Path) -> None:
    """Play the workload: write a file into upper/ of the overlay's ext3 with debugfs -w,
    on a copy of the region, then write back only the 4 KiB blocks that changed."""
    require_tool("debugfs")
    offset, size = overlay_region(path)
    scratch, payload, script = work / "region.ext3", work / "payload", work / "debugfs.cmd"
    with open(path, "rb") as src, open(scratch, "wb") as dst:
        src.seek(offset)
        dst.write(src.read(size))
    original = scratch.read_bytes()
    payload.write_bytes(content)
    script.write_text(f"cd upper\nwrite {payload} {name}\n")
    result = subprocess.run(["debugfs", "-w", "-f", str(script), str(scratch)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    changed = scratch.read_bytes()
    assert changed != original
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in range(0, size, 4096):
            if changed[block:block + 4096] != original[block:block + 4096]:
                os.pwrite(fd, changed[block:block + 4096], offset + block)
        os.fsync(fd)
    finally:
        os.close(fd)
    for leftover in (scratch, payload, script):
        leftover.unlink()


@dataclass
class Site:
    """One test's operator environment: the directory standing in for the hostPath, the
    operator's journal, the Lease namespace and the metrics port."""

    volume: Path
    journal: Path
    namespace: str
    metrics_port: int
    work: Path

    def env(self) -> dict[str, str]:
        return {
            "SIFOVERLAY_VOLUME_ROOTS": f"hostPath:{HOST_DIR}={self.volume}",
            "SIFOVERLAY_JOURNAL_DIR": str(self.journal),
            "SIFOVERLAY_STATE_DIR": str(self.journal.parent / "state"),  # engine lease records, scratch
            "SIFOVERLAY_LEASE_NAMESPACE": self.namespace,
            "SIFOVERLAY_RECHECK_SECONDS": "1",
            "SIFOVERLAY_DRIFT_SECONDS": "1",
            "SIFOVERLAY_LEASE_RETRY_SECONDS": "0.5",
            "SIFOVERLAY_METRICS_PORT": str(self.metrics_port),
            "SIFOVERLAY_METRICS_ADDR": "127.0.0.1",
            "SIFOVERLAY_POLICY": json.dumps(POLICY),
        }

    def make_image(self, vectors: Path, relpath: str = "team/app.sif") -> Path:
        require_tool("mkfs.ext3")
        from sifoverlay import engine

        path = self.volume / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine_base_source(), path)  # `vectors`: kept for the callers' signature
        os.chmod(path, 0o644)
        engine.create_overlay(path, size_mib=64, sparse=True, journal_dir=str(self.journal))
        return path


@pytest.fixture
def site(tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Site:
    s = Site(volume=tmp_path / "volume", journal=tmp_path / "journal", namespace=namespace,
             metrics_port=free_port(), work=tmp_path / "work")
    s.volume.mkdir()
    s.work.mkdir()
    for key, value in s.env().items():
        monkeypatch.setenv(key, value)
    return s


@contextlib.contextmanager
def kopf_runner(*extra: str) -> Iterator[Any]:
    """The real operator in this process; a fresh registry per run (kopf run re-executes
    operator/main.py, which registers the handlers into kopf's current registry)."""
    import kopf
    from kopf.testing import KopfRunner

    registry = type(kopf.get_default_registry())()
    with KopfRunner(["run", "--standalone", "--all-namespaces", *extra, OPERATOR_SCRIPT],
                    registry=registry, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-4000:]
    assert runner.exit_code == 0, runner.output[-4000:]


@pytest.fixture
def operator(site: Site, kube: Kube) -> Iterator[Any]:
    with kopf_runner() as runner:
        yield runner


# --- the test plays the Job controller and the kubelet -----------------------------------------------
class Cluster:
    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.ns = namespace

    def create_overlayjob(self, name: str, relpath: str = "team/app.sif", **spec: Any) -> dict[str, Any]:
        from sifoverlay.k8s import well_known as wk

        body = {
            "apiVersion": wk.API_VERSION, "kind": wk.KIND, "metadata": {"name": name},
            "spec": {"image": {"hostPath": {"path": HOST_DIR}, "path": relpath},
                     "workload": {"command": ["sh", "-c", "echo hi > /out"]},
                     **spec},
        }
        return self.kube.custom.create_namespaced_custom_object(wk.GROUP, wk.VERSION, self.ns, wk.PLURAL, body)

    def get(self, name: str) -> dict[str, Any] | None:
        import kubernetes

        from sifoverlay.k8s import well_known as wk
        try:
            return self.kube.custom.get_namespaced_custom_object(wk.GROUP, wk.VERSION, self.ns, wk.PLURAL, name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.get(name) or {}).get("status") or {})

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        for cond in self.status(name).get("conditions") or []:
            if cond["type"] == ctype:
                return cond
        return {}

    def wait_phase(self, name: str, phase: str, timeout: float = WAIT) -> dict[str, Any]:
        return wait_for(f"{name} phase {phase}", lambda: (s := self.status(name)).get("phase") == phase and s, timeout)

    def job(self, name: str) -> Any:
        import kubernetes
        try:
            return self.kube.batch.read_namespaced_job(name, self.ns)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def wait_job(self, name: str) -> Any:
        return wait_for(f"Job {name}", lambda: self.job(name))

    def start_pod(self, job: Any, *, finalizer: bool = False) -> str:
        """What the Job controller and kubelet do: a Pod from the template, then Running."""
        template = job.spec.template
        pod_name = f"{job.metadata.name}-{secrets.token_hex(3)}"
        meta: dict[str, Any] = {
            "name": pod_name,
            "labels": {**(template.metadata.labels or {}), "job-name": job.metadata.name},
            "annotations": dict(template.metadata.annotations or {}),
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name,
                                 "uid": job.metadata.uid, "controller": True}],
        }
        if finalizer:  # lets a delete go through MODIFIED(deletionTimestamp) then DELETED, like kubelet
            meta["finalizers"] = ["test.sifoverlay.dev/kubelet"]
        spec = self.kube.core.api_client.sanitize_for_serialization(template.spec)
        self.kube.core.create_namespaced_pod(self.ns, {"metadata": meta, "spec": spec})
        self.kube.core.patch_namespaced_pod_status(pod_name, self.ns, {"status": {"phase": "Running"}})
        return pod_name

    def pod_phase(self, pod: str, phase: str, **extra: Any) -> None:
        self.kube.core.patch_namespaced_pod_status(pod, self.ns, {"status": {"phase": phase, **extra}})

    def finish_job(self, job_name: str, condition: str, message: str = "") -> None:
        conds = [{"type": condition, "status": "True", "reason": "Test", "message": message}]
        if condition == "Failed":
            conds[0]["reason"] = "BackoffLimitExceeded"
        self.kube.batch.patch_namespaced_job_status(job_name, self.ns, {"status": {"conditions": conds}},
                                                    _content_type="application/merge-patch+json")

    def delete_pod(self, pod: str) -> None:
        self.kube.core.delete_namespaced_pod(pod, self.ns)

    def release_pod(self, pod: str) -> None:
        """The kubelet is done with a terminating pod: drop the finalizer, the pod goes."""
        self.kube.core.patch_namespaced_pod(pod, self.ns, {"metadata": {"finalizers": None}},
                                            _content_type="application/merge-patch+json")

    def lease_holders(self) -> list[str]:
        return [lease.spec.holder_identity for lease in self.kube.coordination.list_namespaced_lease(self.ns).items]


@pytest.fixture
def cluster(kube: Kube, namespace: str) -> Cluster:
    return Cluster(kube, namespace)
