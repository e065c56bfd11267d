"""Registry test fixtures: a real Debian `docker-registry` (distribution 2.8) on a random
loopback port per session (config of test-stack-lowlevel §5 in a temp dir), one with
htpasswd auth, OCI-SIF images with real squashfs layers and a real ext3 overlay."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import require_tool

CONFIG = """version: 0.1
log: {{level: warn, fields: {{service: registry}}}}
storage:
  filesystem: {{rootdirectory: {data}}}
  delete: {{enabled: true}}
  cache: {{blobdescriptor: inmemory}}
http:
  addr: 127.0.0.1:{port}
  headers: {{X-Content-Type-Options: [nosniff]}}
health: {{storagedriver: {{enabled: false}}}}
"""
AUTH = """auth:
  htpasswd: {{realm: sifoverlay-test, path: {htpasswd}}}
"""
USER, PASSWORD = "pusher", "s3cret-pw"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SQUASHFS = "application/vnd.sylabs.image.layer.v1.squashfs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,  # type: ignore[call-overload]
                          check=check, **kw)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    data: Path

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def upload_has_data(self, repo: str) -> bool:
        """An upload session of `repo` has received bytes (a PATCH is under way or done)."""
        uploads = self.data / "docker" / "registry" / "v2" / "repositories" / repo / "_uploads"
        try:
            return any((session / "data").stat().st_size > 0 for session in uploads.iterdir())
        except FileNotFoundError:
            return False


def bcrypt_hash(password: str) -> str:
    with warnings.catch_warnings():  # crypt is deprecated in 3.11, but it is glibc's bcrypt: no extra dep
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))  # cost 4: checked per request


def _start(work: Path, *, auth: bool) -> tuple[subprocess.Popen[bytes], Registry]:
    require_tool("docker-registry")
    port = free_port()
    data = work / "data"
    data.mkdir()
    config = CONFIG.format(data=data, port=port)
    if auth:
        htpasswd = work / "htpasswd"
        htpasswd.write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
        config += AUTH.format(htpasswd=htpasswd)
    (work / "config.yml").write_text(config)
    log = open(work / "log.txt", "wb")  # noqa: SIM115 - the daemon keeps it
    proc = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    registry = Registry(f"127.0.0.1:{port}", data)
    deadline = time.monotonic() + 20
    while True:
        try:
            if requests.get(registry.url("/v2/"), timeout=1).status_code in (200, 401):
                return proc, registry
        except requests.exceptions.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"docker-registry did not start: {(work / 'log.txt').read_text()[-600:]}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    work = Path(tempfile.mkdtemp(prefix="sifoverlay-registry-"))
    proc, reg = _start(work, auth=False)
    try:
        yield reg
    finally:
        _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[Registry]:
    work = Path(tempfile.mkdtemp(prefix="sifoverlay-registry-auth-"))
    proc, reg = _start(work, auth=True)
    try:
        yield reg
    finally:
        _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Own journal dir and an empty docker config (never the user's credentials)."""
    monkeypatch.setenv("SIFOVERLAY_JOURNAL_DIR", str(tmp_path / "journal"))
    docker = tmp_path / "docker-config"
    docker.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return docker


def write_docker_config(directory: Path, host: str, user: str, password: str) -> None:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))


# -- images ------------------------------------------------------------------------------------
def squashfs_from(tree: Path, out: Path, *extra: str) -> Path:
    require_tool("mksquashfs")
    sh("mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress", *extra)
    return out


def build_ocisif(layers: list[Path], out: Path, *, overlay_mib: int | None = 64) -> Path:
    """OCI-SIF of the given squashfs layer files (+ a sparse ext3 overlay from the engine)."""
    from sifoverlay import engine
    from sifoverlay.ocisif import jsonedit
    from sifoverlay.ocisif.build import write_ocisif

    digests = [sha256_file(p) for p in layers]
    config = jsonedit.canonical({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": digests},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    })
    manifest = jsonedit.canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": jsonedit.descriptor_of(config, OCI_CONFIG),
        "layers": [{"mediaType": SQUASHFS, "digest": d, "size": p.stat().st_size} for d, p in zip(digests, layers)],
    })
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [jsonedit.descriptor_of(manifest, OCI_MANIFEST)]}
    write_ocisif(out, [*layers, config, manifest], index)
    if overlay_mib:
        engine.create_overlay(out, size_mib=overlay_mib, sparse=True)
    return out


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    """One small squashfs layer + a 64 MiB sparse overlay."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello from the lower layer\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_bytes(os.urandom(4096))
    layer = squashfs_from(tree, tmp_path / "layer0.sqfs")
    image = build_ocisif([layer], tmp_path / "small.oci.sif")
    layer.unlink()
    return image


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "sifoverlay", *argv], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=env or dict(os.environ))
