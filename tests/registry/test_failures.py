"""Failures: a push killed mid-upload, wrong or missing credentials, no registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sifoverlay.ocisif import open_image

from .conftest import PASSWORD, USER, Registry, build_ocisif, free_port, run_cli, sha256_file, squashfs_from, \
    write_docker_config

pytestmark = pytest.mark.registry


@pytest.fixture
def big_image(tmp_path: Path) -> Path:
    """A 96 MiB incompressible squashfs layer (+ overlay): uploads take long enough to be
    interrupted."""
    tree = tmp_path / "bigtree"
    tree.mkdir()
    with open(tree / "random.bin", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    layer = squashfs_from(tree, tmp_path / "big.sqfs", "-noI", "-noD", "-noF", "-noX")
    (tree / "random.bin").unlink()
    image = build_ocisif([layer], tmp_path / "big.oci.sif")
    layer.unlink()
    return image


def test_push_killed_midway_leaves_the_image_untouched(tmp_path: Path, registry: Registry, big_image: Path) -> None:
    before = sha256_file(big_image)
    siblings = sorted(p.name for p in big_image.parent.iterdir())
    ref = f"docker://{registry.host}/fail/killed:v1"
    proc = subprocess.Popen([sys.executable, "-m", "sifoverlay", "push", str(big_image), ref, "--plain-http"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not registry.upload_has_data("fail/killed"):
        assert proc.poll() is None, f"push ended before it could be interrupted: {proc.stderr.read()!r}"
        assert time.monotonic() < deadline, "no upload started"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert sha256_file(big_image) == before
    assert sorted(p.name for p in big_image.parent.iterdir()) == siblings  # no lease or temp file left
    retry = run_cli("push", str(big_image), ref, "--plain-http", "--json")
    assert retry.returncode == 0, retry.stderr
    result = json.loads(retry.stdout)
    with open_image(big_image) as img:
        assert result["manifest"] == img.manifest.digest
        assert [l["digest"] for l in result["layers"]] == [l.digest for l in img.layers]
    pulled = run_cli("pull", ref, str(tmp_path / "pulled.oci.sif"), "--plain-http")
    assert pulled.returncode == 0, pulled.stderr
    with open_image(tmp_path / "pulled.oci.sif") as img:
        img.verify_layers(include_overlay=True)
    assert sha256_file(big_image) == before


@pytest.mark.parametrize("scheme", ["docker", "oras"])
def test_auth_failures_are_one_line(tmp_path: Path, auth_registry: Registry, small_image: Path,
                                    isolated_env: Path, scheme: str) -> None:
    ref = f"{scheme}://{auth_registry.host}/auth/img:v1"
    anonymous = run_cli("push", str(small_image), ref, "--plain-http")
    assert anonymous.returncode == 1
    assert anonymous.stderr.count("\n") == 1, anonymous.stderr
    assert "authentication failed" in anonymous.stderr and auth_registry.host in anonymous.stderr

    write_docker_config(isolated_env, auth_registry.host, USER, "wrong-password")
    wrong = run_cli("push", str(small_image), ref, "--plain-http")
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert "authentication failed" in wrong.stderr and f"'{USER}'" in wrong.stderr

    write_docker_config(isolated_env, auth_registry.host, USER, PASSWORD)
    right = run_cli("push", str(small_image), ref, "--plain-http")
    assert right.returncode == 0, right.stderr
    pulled = run_cli("pull", ref, str(tmp_path / "back.sif"), "--plain-http")
    assert pulled.returncode == 0, pulled.stderr


@pytest.mark.parametrize("scheme", ["docker", "oras"])
def test_unreachable_registry_is_one_line(small_image: Path, scheme: str) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = run_cli("push", str(small_image), f"{scheme}://127.0.0.1:{port}/x/y:v1", "--plain-http")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot reach registry 127.0.0.1:{port}" in proc.stderr
    assert time.monotonic() - started < 30  # no retry loop with back-off sleeps


def test_bad_reference_is_usage_error(small_image: Path) -> None:
    proc = run_cli("push", str(small_image), "docker://127.0.0.1:1/UPPER:v1", "--plain-http")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "bad repository name" in proc.stderr


def _corrupt_first_layer(image: Path) -> None:
    with open_image(image) as img:
        offset = img.layers[0].offset
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, b"XXXX", offset)  # the squashfs magic
    finally:
        os.close(fd)


def test_corrupt_layer_is_refused_and_nothing_is_tagged(registry: Registry, small_image: Path) -> None:
    import requests

    _corrupt_first_layer(small_image)
    for fmt in ("squashfs", "tar"):
        ref = f"docker://{registry.host}/fail/corrupt:{fmt}"
        proc = run_cli("push", str(small_image), ref, "--plain-http", "--layer-format", fmt)
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1, proc.stderr
        expected = "does not match the bytes sent" if fmt == "squashfs" else "sqfs2tar failed"
        assert expected in proc.stderr
        manifest = requests.get(registry.url(f"/v2/fail/corrupt/manifests/{fmt}"), timeout=10)
        assert manifest.status_code == 404
