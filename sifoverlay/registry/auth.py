"""Registry credentials from the usual docker config.

Looked up, first hit wins: `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`, then
`$REGISTRY_AUTH_FILE` / `$XDG_RUNTIME_DIR/containers/auth.json` (podman and skopeo).
An entry under `auths` keyed by the host (or its URL form `https://HOST/v1/`, or
`index.docker.io` for Docker Hub) gives either `auth` (base64 of `user:password`) or
`username` + `password`, or an `identitytoken` (an OAuth2 refresh token). Credential
helpers (`credsStore`, `credHelpers`) are not run: an entry that needs one is reported,
so the user knows why no credentials were sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from sifoverlay.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = ""  # the config file they came from


def config_paths() -> Iterator[str]:
    docker_config = os.environ.get("DOCKER_CONFIG")
    if docker_config:
        yield os.path.join(docker_config, "config.json")
    home = os.path.expanduser("~")
    if home and home != "~":
        yield os.path.join(home, ".docker", "config.json")
    auth_file = os.environ.get("REGISTRY_AUTH_FILE")
    if auth_file:
        yield auth_file
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        yield os.path.join(runtime, "containers", "auth.json")


def _keys_for(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"https://{host}/v1/", f"https://{host}/v2/", f"http://{host}"]
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys += ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    return keys


def _load(path: str) -> dict[str, object] | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: cannot read registry credentials: %s", path, exc.strerror)
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(path, f"docker config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(path, "docker config is not a JSON object")
    return data


def _decode(entry: dict[str, object], path: str, host: str) -> Credentials | None:
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            text = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(path, f"auths entry for {host}: 'auth' is not base64 of user:password") from None
        user, sep, password = text.partition(":")
        if not sep:
            raise UsageError(path, f"auths entry for {host}: 'auth' does not hold user:password")
        return Credentials(user, password, token if isinstance(token, str) else None, path)
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str) and user:
        return Credentials(user, password, token if isinstance(token, str) else None, path)
    if isinstance(token, str) and token:
        return Credentials("<token>", "", token, path)
    return None


def find_credentials(host: str) -> Credentials | None:
    """Credentials for `host` (HOST[:PORT]) from the first config file that has them."""
    for path in config_paths():
        data = _load(path)
        if data is None:
            continue
        auths = data.get("auths")
        if isinstance(auths, dict):
            for key in _keys_for(host):
                entry = auths.get(key)
                if isinstance(entry, dict):
                    found = _decode(entry, path, host)
                    if found is not None:
                        log.debug("credentials for %s from %s", host, path)
                        return found
        helpers = data.get("credHelpers")
        if (isinstance(helpers, dict) and host in helpers) or data.get("credsStore"):
            log.warning("%s: credentials for %s may live in a credential helper, which sifoverlay does not run",
                        path, host)
    return None
