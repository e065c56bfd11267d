"""Reference parsing and docker-config credentials (pure functions, no registry)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.registry.auth import find_credentials
from sifoverlay.registry.refs import parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("oras://127.0.0.1:5000/tooling/art:v1", ("oras", "127.0.0.1:5000", "tooling/art", "v1", None)),
    ("docker://localhost/x", ("docker", "localhost", "x", "latest", None)),
    ("docker://reg.example.org/a/b/c:1.2-rc", ("docker", "reg.example.org", "a/b/c", "1.2-rc", None)),
    (f"docker://127.0.0.1:5000/x:t@{DIGEST}", ("docker", "127.0.0.1:5000", "x", "t", DIGEST)),
    ("docker://alpine:3", ("docker", "docker.io", "library/alpine", "3", None)),
    ("docker://user/img", ("docker", "docker.io", "user/img", "latest", None)),
])
def test_parse(text: str, expected: tuple[object, ...]) -> None:
    ref = parse(text)
    assert (ref.scheme, ref.host, ref.repository, ref.tag, ref.digest) == expected


def test_base_url_and_hub_api_host() -> None:
    assert parse("docker://127.0.0.1:5000/x:t").base_url(plain_http=True) == "http://127.0.0.1:5000/v2/x"
    assert parse("docker://alpine").base_url(plain_http=False) == "https://registry-1.docker.io/v2/library/alpine"


@pytest.mark.parametrize(("text", "problem"), [
    ("http://h/x", "not a registry reference"),
    ("library://h/x", "not a registry reference"),
    ("docker://h.io/UPPER", "bad repository name"),
    ("docker://h.io/x:bad!tag", "bad tag"),
    ("docker://h.io/x@sha256:123", "bad digest"),
    (f"oras://h.io/x@{DIGEST}", "take a tag, not a digest"),
    ("docker://h.io/", "bad repository name"),
])
def test_parse_refuses(text: str, problem: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    assert problem in str(err.value) and text in str(err.value)
    assert "\n" not in str(err.value)


def _config(directory: Path, auths: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_credentials_from_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    auth = base64.b64encode(b"alice:pa:ss").decode()
    path = _config(tmp_path / "dc", {"127.0.0.1:5000": {"auth": auth}, "https://other.io/v1/":
                                     {"username": "bob", "password": "pw"}})
    first = find_credentials("127.0.0.1:5000")
    assert first is not None and (first.username, first.password, first.source) == ("alice", "pa:ss", str(path))
    second = find_credentials("other.io")
    assert second is not None and (second.username, second.password) == ("bob", "pw")
    assert find_credentials("nowhere.io") is None
    assert "pa:ss" not in repr(first)  # secrets stay out of logs


def test_credentials_fall_back_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    hub = {"auth": base64.b64encode(b"hub:x").decode()}
    _config(tmp_path / "home" / ".docker", {"https://index.docker.io/v1/": hub})
    found = find_credentials("docker.io")
    assert found is not None and found.username == "hub"


def test_bad_docker_config_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    _config(tmp_path, {"h.io": {"auth": "%%%not-base64"}})
    with pytest.raises(UsageError) as err:
        find_credentials("h.io")
    assert str(err.value).startswith(str(tmp_path / "config.json")) and "base64" in str(err.value)
