"""Registry references: `oras://HOST/REPO:TAG` and `docker://HOST/REPO:TAG[@sha256:...]`.

The host is always explicit when the first path component looks like one (has a dot or
a port, or is `localhost`); otherwise Docker Hub is meant (`docker.io`, one-word names in
`library/`), as docker and skopeo read it. A missing tag means `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sifoverlay.errors import UsageError

SCHEMES: Final = ("oras", "docker")
DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_API: Final = "registry-1.docker.io"
DEFAULT_TAG: Final = "latest"

# distribution/reference grammar, reduced to what a push or pull target needs.
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY_RE: Final = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE: Final = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference. `host` is what credentials are filed under (docker.io for the
    Hub); `api_host` is where requests go."""

    scheme: str
    host: str
    repository: str
    tag: str
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What the manifest endpoint is addressed by: the digest if given, else the tag."""
        return self.digest or self.tag

    def base_url(self, *, plain_http: bool) -> str:
        return f"{'http' if plain_http else 'https'}://{self.api_host}/v2/{self.repository}"

    def __str__(self) -> str:
        text = f"{self.scheme}://{self.host}/{self.repository}:{self.tag}"
        return f"{text}@{self.digest}" if self.digest else text


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


def parse(text: str, *, schemes: tuple[str, ...] = SCHEMES) -> Reference:
    """Parse a registry reference; UsageError naming the reference if it is malformed."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise UsageError(text, f"not a registry reference: expected {wanted}HOST/REPOSITORY[:TAG]")
    rest, _, digest = rest.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise UsageError(text, f"bad digest {digest!r}: expected sha256:<64 hex digits>")
    if scheme == "oras" and digest:
        raise UsageError(text, "oras:// references take a tag, not a digest")
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_host(first):
        host, path = first, remainder
        if not _HOST_RE.match(host):
            raise UsageError(text, f"bad registry host {host!r}")
    else:
        host, path = DOCKER_HUB, rest
        if path and "/" not in path:
            path = f"library/{path}"
    name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "")
    if not colon:
        name, tag = path, ""
    if not name or not _REPOSITORY_RE.match(name):
        raise UsageError(text, f"bad repository name {name!r}: lowercase letters, digits and . _ - separators")
    if colon and not _TAG_RE.match(tag):
        raise UsageError(text, f"bad tag {tag!r}")
    return Reference(scheme, host, name, tag or DEFAULT_TAG, digest or None)
