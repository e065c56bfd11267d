"""oras:// push and pull against the real registry: SingularityCE's artifact shape, a
byte-identical round trip, atomic verified writes."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path

import pytest
import requests

from sifoverlay.errors import RegistryError
from sifoverlay.registry import pull, push

from .conftest import Registry, run_cli, sh, sha256_file

pytestmark = pytest.mark.registry
EMPTY_CONFIG = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_push_pull_round_trip_is_byte_identical(tmp_path: Path, registry: Registry, small_image: Path) -> None:
    before = sha256_file(small_image)
    ref = f"oras://{registry.host}/oras/roundtrip:v1"
    pushed = run_cli("push", str(small_image), ref, "--plain-http", "--json")
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["layers"][0]["digest"] == before and result["layers"][0]["size"] == small_image.stat().st_size
    out = tmp_path / "back.sif"
    pulled = run_cli("pull", ref, str(out), "--plain-http", "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert sha256_file(out) == before == sha256_file(small_image)
    assert json.loads(pulled.stdout)["manifest"] == result["manifest"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back.sif")]  # no temp file left


def test_artifact_has_singularity_media_types(registry: Registry, small_image: Path) -> None:
    """What `singularity pull oras://` looks for (spec §2.3), checked with skopeo."""
    ref = f"{registry.host}/oras/shape:v1"
    push(small_image, f"oras://{ref}", plain_http=True)
    manifest_raw = sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout
    manifest = json.loads(manifest_raw)
    assert manifest["config"]["mediaType"] == "application/vnd.sylabs.sif.config.v1+json"
    assert (manifest["config"]["digest"], manifest["config"]["size"]) == (EMPTY_CONFIG, 2)
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.sylabs.sif.layer.v1.sif"
    assert layer["annotations"]["org.opencontainers.image.title"] == small_image.name
    blob = requests.get(registry.url(f"/v2/oras/shape/blobs/{layer['digest']}"), timeout=30).content
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"] == sha256_file(small_image)


def test_pull_refuses_a_corrupt_blob_and_keeps_the_old_file(tmp_path: Path, registry: Registry,
                                                           small_image: Path) -> None:
    """A manifest whose layer digest does not match the blob's bytes: nothing written."""
    good = push(small_image, f"oras://{registry.host}/oras/corrupt:v1", plain_http=True)
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the sif" * 100)
    other_digest = "sha256:" + hashlib.sha256(other.read_bytes()).hexdigest()
    base = registry.url("/v2/oras/corrupt")
    up = requests.post(f"{base}/blobs/uploads/", timeout=10)
    location = urllib.parse.urljoin(registry.url("/"), up.headers["Location"])
    done = requests.put(f"{location}&digest={other_digest}", data=other.read_bytes(), timeout=10)
    assert done.status_code == 201
    manifest = json.loads(requests.get(f"{base}/manifests/v1", timeout=10,
                                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content)
    manifest["layers"][0]["digest"] = other_digest  # size stays the SIF's: a lying descriptor
    put = requests.put(f"{base}/manifests/bad", data=json.dumps(manifest), timeout=10,
                       headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert put.status_code == 201
    (tmp_path / "outdir").mkdir()
    out = tmp_path / "outdir" / "out.sif"
    out.write_bytes(b"previous content")
    with pytest.raises(RegistryError) as err:
        pull(f"oras://{registry.host}/oras/corrupt:bad", out, plain_http=True)
    assert "nothing written" in str(err.value) and other_digest in str(err.value)
    assert out.read_bytes() == b"previous content"
    assert [p.name for p in out.parent.iterdir()] == ["out.sif"]  # no temp file left
    assert good.manifest_digest != put.headers["Docker-Content-Digest"]


def test_pull_of_a_missing_tag_is_one_line(tmp_path: Path, registry: Registry) -> None:
    proc = run_cli("pull", f"oras://{registry.host}/oras/none:nope", str(tmp_path / "x.sif"), "--plain-http")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "manifest not found" in proc.stderr
    assert not (tmp_path / "x.sif").exists()


def test_progress_bar_only_on_a_tty(registry: Registry, small_image: Path) -> None:
    import os
    import pty
    import subprocess
    import sys

    ref = f"oras://{registry.host}/oras/progress:v1"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sifoverlay", "push", str(small_image), ref, "--plain-http"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    tty_text = b"".join(chunks).decode()
    total = small_image.stat().st_size / (1 << 20)
    assert "pushing [" in tty_text and f"/ {total:.1f} MiB" in tty_text
    assert b"pushing [" not in out  # never on stdout
    piped = run_cli("push", str(small_image), ref, "--plain-http")
    assert piped.returncode == 0 and "pushing [" not in piped.stderr
