"""Fixtures of the importer tests: the OCI layout vectors by name."""

from __future__ import annotations

from pathlib import Path

import pytest

# Every layout in vectors/oci-layouts, listed so that parametrised ids are stable; a test
# checks the list against the directory. aufs-docker-v2-manifest's blobs do not match
# their digests (index size, config and layer digests are off): it is imported only
# after re-addressing (test_import_tree.py) and otherwise serves as a corrupt input.
LAYOUT_VECTORS = (
    "hard-link-1", "hard-link-2", "hard-link-delete-1", "hard-link-delete-2", "hard-link-delete-3",
    "hard-link-delete-4", "hard-link-delete-xattr", "hello-world-cosign-manifest",
    "hello-world-cosign-manifest-list", "hello-world-docker-v2-manifest",
    "hello-world-docker-v2-manifest-list", "many-layers", "overlayfs-docker-v2-manifest",
    "root-dir-entry", "whiteout-explicit-dir", "whiteout-explicit-file", "whiteout-opaque",
    "whiteout-opaque-end",
)
BROKEN_VECTORS = ("aufs-docker-v2-manifest",)
LIST_VECTORS = ("hello-world-docker-v2-manifest-list", "hello-world-cosign-manifest-list")


@pytest.fixture()
def layouts(vectors: Path) -> Path:
    return vectors / "oci-layouts"


@pytest.fixture()
def busybox_sif(vectors: Path) -> Path:
    return vectors / "singularity" / "busybox_amd64.sif"
