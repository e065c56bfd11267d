"""Records returned by push and pull (the CLI prints them, --json dumps `as_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PushedLayer:
    media_type: str
    digest: str
    size: int
    diff_id: str
    uploaded: bool  # False: the registry had it already
    source: str  # "squashfs", "overlay", "sif"


@dataclass(frozen=True, slots=True)
class PushResult:
    image: str
    reference: str
    transport: str  # "oras" | "docker"
    layer_format: str  # "sif" (oras), "squashfs" or "tar"
    manifest_digest: str
    config_digest: str
    layers: tuple[PushedLayer, ...]
    seconds: float
    sync: dict[str, Any] | None = field(default=None)  # engine.sync's result, None without overlay

    @property
    def bytes_uploaded(self) -> int:
        return sum(layer.size for layer in self.layers if layer.uploaded)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image, "reference": self.reference, "transport": self.transport,
            "layer_format": self.layer_format, "manifest": self.manifest_digest, "config": self.config_digest,
            "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size, "diff_id": l.diff_id,
                        "uploaded": l.uploaded, "source": l.source} for l in self.layers],
            "bytes_uploaded": self.bytes_uploaded, "seconds": round(self.seconds, 3), "sync": self.sync,
        }


@dataclass(frozen=True, slots=True)
class PullResult:
    reference: str
    output: str
    transport: str
    manifest_digest: str
    layer_digests: tuple[str, ...]
    size: int
    seconds: float
    imported: bool = False  # docker://: went through the Foundation importer

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "output": self.output, "transport": self.transport,
            "manifest": self.manifest_digest, "layers": list(self.layer_digests), "size": self.size,
            "seconds": round(self.seconds, 3), "imported": self.imported,
        }
