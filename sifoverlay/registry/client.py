"""A small OCI distribution API client (requests): auth challenges, blob uploads,
manifests. Every failure becomes ONE `RegistryError` line naming the reference.

Auth: the first 401 carries `WWW-Authenticate`. `Basic` -> credentials from the docker
config are sent on every request; `Bearer` -> a token is fetched from the realm (with
the credentials if any, anonymously otherwise) for `repository:REPO:pull[,push]`.
Uploads: POST opens a session, PATCH sends chunks with `Content-Range`, PUT `?digest=`
closes it; the registry checks the digest, so a blob that changed under us is refused.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, Final

import requests

from sifoverlay.errors import RegistryError

from .auth import Credentials, find_credentials
from .refs import Reference

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
READ_TIMEOUT: Final = 300.0
CHUNK_SIZE: Final = 32 << 20  # PATCH size: big chunks, few round trips, bounded memory
Progress = Callable[[int, int], None]


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests exception ('Connection refused', ...)."""
    text = str(exc)
    for marker in ("] ", "Errno"):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    return " ".join(text.strip(" ')(\"").split())[:160] or type(exc).__name__


def _oci_errors(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:160]
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return ""
    return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors if isinstance(e, dict))


class RegistryClient:
    """One repository on one registry, for `actions` ("pull" or "pull,push")."""

    def __init__(self, ref: Reference, *, plain_http: bool = False, actions: str = "pull",
                 credentials: Credentials | None = None, session: requests.Session | None = None) -> None:
        self.ref = ref
        self.plain_http = plain_http
        self.actions = actions
        self.base = ref.base_url(plain_http=plain_http)
        self.origin = f"{'http' if plain_http else 'https'}://{ref.api_host}"
        self.credentials = credentials if credentials is not None else find_credentials(ref.host)
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "sifoverlay"
        self._auth_header: str | None = None

    # -- transport -------------------------------------------------------------------------
    def fail(self, problem: str, **data: Any) -> RegistryError:
        return RegistryError(str(self.ref), problem, **data)

    def _send(self, method: str, url: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", None) or {})
        if self._auth_header:
            headers["Authorization"] = self._auth_header
        try:
            return self.session.request(method, url, headers=headers, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                                        allow_redirects=method in ("GET", "HEAD"), **kw)
        except requests.exceptions.SSLError as exc:
            raise self.fail(f"TLS error talking to {self.ref.api_host}: {_short(exc)}; "
                            "use --plain-http for a plain-HTTP registry") from None
        except requests.exceptions.ConnectionError as exc:
            raise self.fail(f"cannot reach registry {self.ref.api_host}: {_short(exc)}") from None
        except requests.exceptions.Timeout:
            raise self.fail(f"registry {self.ref.api_host} did not answer in time") from None
        except requests.exceptions.RequestException as exc:
            raise self.fail(f"request to {self.ref.api_host} failed: {_short(exc)}") from None

    def request(self, method: str, url: str, *, ok: Iterable[int], **kw: Any) -> requests.Response:
        """Send, answering one auth challenge; RegistryError unless the status is in `ok`."""
        response = self._send(method, url, **kw)
        if response.status_code == 401 and self._authenticate(response):
            response = self._send(method, url, **kw)
        if response.status_code in (401, 403):
            who = (f"credentials of {self.credentials.username!r} from {self.credentials.source}"
                   if self.credentials else "no credentials for this host in the docker config")
            verb = "authentication failed" if response.status_code == 401 else "access denied"
            raise self.fail(f"{verb} at {self.ref.api_host} ({response.status_code}; {who})",
                            status=response.status_code)
        if response.status_code not in set(ok):
            detail = _oci_errors(response)
            raise self.fail(f"{method} {urllib.parse.urlsplit(url).path} answered {response.status_code}"
                            + (f": {detail}" if detail else ""), status=response.status_code)
        return response

    def _authenticate(self, response: requests.Response) -> bool:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.credentials is None or self._auth_header is not None:
                return False
            self._auth_header = _basic(self.credentials)
            return True
        if scheme.lower() == "bearer":
            return self._bearer(_parse_params(params))
        return False

    def _bearer(self, params: dict[str, str]) -> bool:
        realm = params.get("realm")
        if not realm:
            return False
        query = {"service": params.get("service", ""), "scope": f"repository:{self.ref.repository}:{self.actions}"}
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            answer = self.session.get(realm, params=query, auth=auth, timeout=(CONNECT_TIMEOUT, 60))
        except requests.exceptions.RequestException as exc:
            raise self.fail(f"cannot reach the token service {realm}: {_short(exc)}") from None
        if answer.status_code != 200:
            return False
        try:
            body = answer.json()
        except ValueError:
            return False
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            return False
        self._auth_header = f"Bearer {token}"
        return True

    def _absolute(self, location: str) -> str:
        return urllib.parse.urljoin(self.origin + "/", location)

    # -- API -------------------------------------------------------------------------------
    def ping(self) -> None:
        self.request("GET", f"{self.origin}/v2/", ok=(200,))

    def blob_exists(self, digest: str) -> bool:
        return self.request("HEAD", f"{self.base}/blobs/{digest}", ok=(200, 404)).status_code == 200

    def start_upload(self) -> BlobUpload:
        response = self.request("POST", f"{self.base}/blobs/uploads/", ok=(202,), headers={"Content-Length": "0"})
        return BlobUpload(self, self._absolute(response.headers["Location"]))

    def upload_bytes(self, data: bytes) -> str:
        """A small blob (config, `{}`) in one POST+PUT; skipped when already there."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.blob_exists(digest):
            upload = self.start_upload()
            upload.write(data)
            upload.finish(digest)
        return digest

    def put_manifest(self, raw: bytes, media_type: str, reference: str) -> str:
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        response = self.request("PUT", f"{self.base}/manifests/{reference}", ok=(201,), data=raw,
                                headers={"Content-Type": media_type})
        echoed = response.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise self.fail(f"registry stored the manifest as {echoed}, expected {digest}")
        return digest

    def get_manifest(self, reference: str, accept: Iterable[str]) -> tuple[bytes, str]:
        response = self.request("GET", f"{self.base}/manifests/{reference}", ok=(200,),
                                headers={"Accept": ", ".join(accept)})
        raw = response.content
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return raw, media_type

    def get_blob(self, digest: str) -> requests.Response:
        return self.request("GET", f"{self.base}/blobs/{digest}", ok=(200,), stream=True)


class BlobUpload:
    """An open upload session: write() PATCHes chunks in order, finish() PUTs the digest."""

    def __init__(self, client: RegistryClient, location: str) -> None:
        self.client = client
        self.location = location
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        end = self.offset + len(data) - 1
        body = bytes(data) if isinstance(data, memoryview) else data
        response = self.client.request("PATCH", self.location, ok=(202,), data=body,
                                       headers={"Content-Type": "application/octet-stream",
                                                "Content-Range": f"{self.offset}-{end}",
                                                "Content-Length": str(len(data))})
        self.location = self.client._absolute(response.headers.get("Location", self.location))
        self.offset = end + 1

    def cancel(self) -> None:
        """Best effort DELETE of the session (the registry would expire it anyway)."""
        try:
            self.client._send("DELETE", self.location)
        except RegistryError:
            pass

    def finish(self, digest: str) -> None:
        sep = "&" if "?" in self.location else "?"
        url = f"{self.location}{sep}digest={urllib.parse.quote(digest)}"
        try:
            self.client.request("PUT", url, ok=(201,), headers={"Content-Length": "0"})
        except RegistryError as exc:
            if "DIGEST_INVALID" in exc.problem:
                raise self.client.fail(f"blob {digest} does not match the bytes sent (the registry computed "
                                       "another digest): the image changed during the push, or is corrupt") from None
            raise


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in _split_commas(text):
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return params


def _split_commas(text: str) -> list[str]:
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]
