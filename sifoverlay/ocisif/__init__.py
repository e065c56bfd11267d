"""The OCI-SIF image model (spec §2): open/validate, select the image, build new files."""

from __future__ import annotations

from .model import (
    OVERLAY_FINGERPRINT_ANNOTATION,
    Blob,
    Layer,
    OciSifImage,
    Overlay,
    open_image,
    select_image_entries,
)

__all__ = [
    "OVERLAY_FINGERPRINT_ANNOTATION",
    "Blob",
    "Layer",
    "OciSifImage",
    "Overlay",
    "open_image",
    "select_image_entries",
]
