"""Read an OCI image layout directory (`index.json` + `blobs/<alg>/<hex>`) and pick one image.

Selection (what `sifoverlay import DIR[:TAG]` means):
* top-level entries of `index.json`, `_cosign...` ref names skipped (signatures and
  attestations stored beside the image, spec §2.5);
* with a TAG, only entries whose `org.opencontainers.image.ref.name` equals it;
* nested indexes / Docker manifest lists are expanded into their image manifests;
* one candidate left -> that image (a single image is taken whatever its platform,
  unless `--platform` was given and contradicts it); several -> the one matching
  `--platform` or, by default, the host platform.

Every blob read is checked against its digest (and its size when the referencing
descriptor states one). Problems raise one-line `BadInput` errors naming the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform as host
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

from ..errors import OciFormatError, UsageError
from . import jsonedit
from . import mediatypes as mt

log = logging.getLogger(__name__)

REF_NAME: Final = "org.opencontainers.image.ref.name"
COSIGN_PREFIX: Final = "_cosign"
JSON_LIMIT: Final = 16 << 20  # manifests / configs / indexes are small; refuse huge ones
_DIGEST_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_MACHINE_TO_GOARCH: Final = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "386",
    "i686": "386", "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
    "riscv64": "riscv64", "loongarch64": "loong64",
}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(None, f"bad --platform {text!r}: want os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], _MACHINE_TO_GOARCH.get(parts[1], parts[1]), parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        machine = host.machine().lower()
        variant = {"aarch64": "v8", "armv7l": "v7", "armv6l": "v6"}.get(machine, "")
        return cls("linux", _MACHINE_TO_GOARCH.get(machine, machine), variant)

    @classmethod
    def from_json(cls, data: object) -> Platform | None:
        if not isinstance(data, dict):
            return None
        return cls(str(data.get("os", "")), str(data.get("architecture", "")), str(data.get("variant", "") or ""))

    def matches(self, wanted: Platform) -> bool:
        """os and arch equal; a wanted variant must match (arm64's implicit variant is v8)."""
        if (self.os, self.architecture) != (wanted.os, wanted.architecture):
            return False
        if not wanted.variant:
            return True
        mine = self.variant or ("v8" if self.architecture == "arm64" else "")
        return mine == wanted.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class BlobRef:
    """An OCI descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SourceImage:
    """The one image chosen from a layout: raw JSON bytes kept for digest checks."""

    layout: OciLayout
    manifest_ref: BlobRef
    manifest: dict[str, Any]
    config_ref: BlobRef
    config_raw: bytes
    config: dict[str, Any]
    layers: tuple[BlobRef, ...]
    platform: Platform | None


def split_source(source: str) -> tuple[str, str | None]:
    """`DIR` or `DIR:TAG` -> (dir, tag). An existing directory named with a colon wins."""
    if os.path.isdir(source) or ":" not in os.path.basename(source.rstrip("/")):
        return source, None
    directory, _, tag = source.rpartition(":")
    return directory, (tag or None)


class OciLayout:
    """Read-only access to one OCI image layout directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isdir(path):
            raise UsageError(path, "no such OCI layout directory")
        index_path = os.path.join(path, "index.json")
        if not os.path.isfile(index_path):
            raise UsageError(path, "not an OCI image layout: index.json is missing")
        self.index = self._parse(_read_limited(index_path, self.path), "index.json")
        if not isinstance(self.index.get("manifests"), list):
            raise OciFormatError(path, "index.json has no 'manifests' list")

    # -- blobs ---------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise OciFormatError(self.path, f"unsupported or malformed digest {digest!r}")
        path = os.path.join(self.path, "blobs", "sha256", digest.split(":", 1)[1])
        if not os.path.isfile(path):
            raise OciFormatError(self.path, f"blob {digest} is missing")
        return path

    def open_blob(self, digest: str) -> BinaryIO:
        return open(self.blob_path(digest), "rb")  # noqa: SIM115 - caller closes

    def read_blob(self, ref: BlobRef) -> bytes:
        """A small (JSON) blob, digest- and size-checked."""
        raw = _read_limited(self.blob_path(ref.digest), self.path)
        check_digest(self.path, ref, hashlib.sha256(raw).hexdigest(), len(raw))
        return raw

    def read_json(self, ref: BlobRef) -> tuple[bytes, dict[str, Any]]:
        raw = self.read_blob(ref)
        return raw, self._parse(raw, f"blob {ref.digest}")

    def _parse(self, raw: bytes, what: str) -> dict[str, Any]:
        try:
            data = jsonedit.parse(raw)
        except jsonedit.JsonError as exc:
            raise OciFormatError(self.path, f"{what} is {exc}") from None
        if not isinstance(data, dict):
            raise OciFormatError(self.path, f"{what} is not a JSON object")
        return data

    # -- selection -----------------------------------------------------------------------
    def select(self, tag: str | None = None, platform: Platform | None = None) -> SourceImage:
        entries = [e for e in self.index["manifests"] if isinstance(e, dict) and not _is_cosign(e)]
        if tag is not None:
            entries = [e for e in entries if _annotations(e).get(REF_NAME) == tag]
            if not entries:
                raise UsageError(self.path, f"no image tagged {tag!r} in index.json")
        candidates: list[tuple[BlobRef, Platform | None]] = []
        for entry in entries:
            self._expand(entry, candidates, depth=0)
        if not candidates:
            raise UsageError(self.path, "index.json lists no image manifest")
        chosen = self._choose(candidates, platform)
        return self._load_image(*chosen, wanted=platform)

    def _expand(self, entry: dict[str, Any], out: list[tuple[BlobRef, Platform | None]], depth: int) -> None:
        ref = to_ref(self.path, entry)
        if mt.is_image_manifest(ref.media_type):
            out.append((ref, Platform.from_json(entry.get("platform"))))
        elif mt.is_index(ref.media_type):
            if depth > 4:
                raise OciFormatError(self.path, f"indexes nested too deeply at {ref.digest}")
            _, child = self.read_json(ref)
            manifests = child.get("manifests")
            if not isinstance(manifests, list):
                raise OciFormatError(self.path, f"index {ref.digest} has no 'manifests' list")
            for sub in manifests:
                if isinstance(sub, dict) and not _is_cosign(sub):
                    self._expand(sub, out, depth + 1)
        else:
            log.debug("%s: skipping index entry of type %s", self.path, ref.media_type)

    def _choose(
        self, candidates: list[tuple[BlobRef, Platform | None]], wanted: Platform | None
    ) -> tuple[BlobRef, Platform | None]:
        if wanted is None and len(candidates) == 1:
            return candidates[0]
        target = wanted or Platform.host()
        matching = [c for c in candidates if c[1] is None or c[1].matches(target)]
        if not matching:
            offered = ", ".join(sorted({str(p) for _, p in candidates if p})) or "none"
            raise UsageError(self.path, f"no image for platform {target} (available: {offered})")
        # Prefer an entry that states the platform over one that does not say.
        matching.sort(key=lambda c: c[1] is None)
        return matching[0]

    def _load_image(self, ref: BlobRef, plat: Platform | None, *, wanted: Platform | None) -> SourceImage:
        _, manifest = self.read_json(ref)
        media_type = manifest.get("mediaType", ref.media_type)
        if not mt.is_image_manifest(media_type) or manifest.get("schemaVersion") != 2:
            raise OciFormatError(self.path, f"manifest {ref.digest} is not an OCI or Docker v2 image manifest")
        if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("layers"), list):
            raise OciFormatError(self.path, f"manifest {ref.digest} lacks config or layers")
        config_ref = to_ref(self.path, manifest["config"])
        config_raw, config = self.read_json(config_ref)
        if wanted is not None and plat is None:
            plat = Platform(str(config.get("os", "")), str(config.get("architecture", "")), str(config.get("variant", "") or ""))
            if not plat.matches(wanted):
                raise UsageError(self.path, f"no image for platform {wanted} (the image is {str(plat) or 'unspecified'})")
        layers = tuple(to_ref(self.path, layer) for layer in manifest["layers"])
        log.info("%s: selected manifest %s (%s), %d layer(s)", self.path, ref.digest, plat or "no platform", len(layers))
        return SourceImage(self, ref, manifest, config_ref, config_raw, config, layers, plat)


def to_ref(path: str, entry: object) -> BlobRef:
    """Validate an OCI descriptor object."""
    if not isinstance(entry, dict):
        raise OciFormatError(path, "descriptor is not a JSON object")
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise OciFormatError(path, f"descriptor with bad mediaType or digest: {json.dumps(entry)[:120]}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OciFormatError(path, f"descriptor {digest} has a bad size {size!r}")
    return BlobRef(media_type, digest, size, dict(_annotations(entry)))


def check_digest(path: str, ref: BlobRef, hexdigest: str, size: int) -> None:
    """The digest is the authority; a wrong descriptor size with the right digest is only
    logged (real layouts have them, e.g. oci-tools' aufs-docker-v2-manifest index, and
    ggcr reads such layouts)."""
    if f"sha256:{hexdigest}" != ref.digest:
        raise OciFormatError(path, f"blob {ref.digest} is corrupt: its content hashes to sha256:{hexdigest}")
    if size != ref.size:
        log.warning("%s: blob %s is %d bytes, its descriptor says %d", path, ref.digest, size, ref.size)


def _annotations(entry: dict[str, Any]) -> dict[str, str]:
    value = entry.get("annotations")
    return value if isinstance(value, dict) else {}


def _is_cosign(entry: dict[str, Any]) -> bool:
    name = _annotations(entry).get(REF_NAME)
    return isinstance(name, str) and name.startswith(COSIGN_PREFIX)


def _read_limited(path: str, layout: str) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read(JSON_LIMIT + 1)
    if len(raw) > JSON_LIMIT:
        raise OciFormatError(layout, f"{os.path.basename(path)} is larger than {JSON_LIMIT} bytes")
    return raw
