"""The `oras` package's Registry, adapted: one clear RegistryError instead of its retry
loop (which sleeps 3+4+11+29+83 s on a refused connection), chunked uploads read with
pread in bounded chunks that report progress, credentials from our docker-config reader
and the auth backend chosen from the registry's own challenge (Basic or Bearer)."""

from __future__ import annotations

import logging
import os
from typing import Any

import oras.provider
import requests

from sifoverlay.errors import RegistryError

from .auth import Credentials, find_credentials
from .client import CHUNK_SIZE, Progress, RegistryClient
from .refs import Reference

log = logging.getLogger(__name__)

_UNRETRIED_REQUEST = oras.provider.Registry.do_request.__wrapped__  # type: ignore[attr-defined]


class OrasRegistry(oras.provider.Registry):
    def __init__(self, ref: Reference, *, plain_http: bool, progress: Progress | None = None,
                 credentials: Credentials | None = None) -> None:
        self.ref = ref
        self.progress = progress
        creds = credentials if credentials is not None else find_credentials(ref.host)
        probe = RegistryClient(ref, plain_http=plain_http, credentials=creds, actions="pull,push")
        scheme = challenge_scheme(probe)
        backend = "basic" if scheme == "basic" and creds is not None else "token"
        super().__init__(hostname=ref.api_host, insecure=plain_http, auth_backend=backend)
        if creds is not None:
            self.auth.set_basic_auth(creds.username, creds.password)
            if backend == "basic":  # sent up front: a 401 round trip per 32 MiB chunk would resend it
                self.set_header("Authorization", f"Basic {self.auth._basic_auth}")
        self.credentials = creds
        probe.ping()  # unreachable, or credentials refused: one clear line before any work

    @property
    def target(self) -> str:
        return f"{self.ref.api_host}/{self.ref.repository}:{self.ref.tag}"

    def fail(self, problem: str) -> RegistryError:
        return RegistryError(str(self.ref), problem)

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict[str, str] | None = None,
                   json: dict[str, Any] | None = None, stream: bool = False) -> requests.Response:
        try:
            response: requests.Response = _UNRETRIED_REQUEST(self, url, method, data, headers, json, stream)
        except requests.exceptions.ConnectionError as exc:
            raise self.fail(f"cannot reach registry {self.ref.api_host}: {exc.__class__.__name__}") from None
        except requests.exceptions.RequestException as exc:
            raise self.fail(f"request to {self.ref.api_host} failed: {exc.__class__.__name__}") from None
        except ValueError as exc:  # oras: "Cannot respond to request for authentication."
            raise self.fail(f"authentication failed at {self.ref.api_host}: {exc}") from None
        if response.status_code in (401, 403):
            raise self.fail(f"authentication failed at {self.ref.api_host} ({response.status_code})")
        if response.status_code == 400 and "DIGEST_INVALID" in response.text:
            raise self.fail("the file does not match its digest (the registry computed another one): "
                            "it changed during the push; run the push again")
        return response

    def chunked_upload(self, blob: str, container: Any, layer: dict[str, Any],
                       chunk_size: int = CHUNK_SIZE) -> requests.Response:
        """POST, PATCH chunks read with pread (progress after each), PUT ?digest=."""
        response = self.do_request(f"{self.prefix}://{container.upload_blob_url()}", "POST",
                                   headers={"Content-Length": "0", **self.headers})
        self._check_200_response(response)
        location = self._get_location(response, container)
        total, done = int(layer["size"]), 0
        fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while done < total:
                data = os.pread(fd, min(chunk_size, total - done), done)
                if not data:
                    raise self.fail(f"{blob} shrank while it was uploaded")
                headers = {"Content-Range": f"{done}-{done + len(data) - 1}", "Content-Length": str(len(data)),
                           "Content-Type": "application/octet-stream", **self.headers}
                response = self.do_request(location, "PATCH", data=data, headers=headers)
                self._check_200_response(response)
                location = self._get_location(response, container)
                done += len(data)
                if self.progress is not None:
                    self.progress(done, total)
        finally:
            os.close(fd)
        sep = "&" if "?" in location else "?"
        return self.do_request(f"{location}{sep}digest={layer['digest']}", "PUT", headers=dict(self.headers))


def challenge_scheme(client: RegistryClient) -> str | None:
    """'basic', 'bearer' or None (no auth asked) from an anonymous GET /v2/."""
    try:
        response = requests.get(f"{client.origin}/v2/", timeout=10)
    except requests.exceptions.RequestException:
        return None  # the ping that follows reports it properly
    if response.status_code != 401:
        return None
    return response.headers.get("WWW-Authenticate", "").partition(" ")[0].lower() or None
