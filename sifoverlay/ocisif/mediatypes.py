"""OCI / Docker / Sylabs media type strings used inside OCI-SIF images (spec §2.3)."""

from __future__ import annotations

from typing import Final

# -- indexes -----------------------------------------------------------------------------
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"

# -- manifests and configs -------------------------------------------------------------------
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"

# -- layers ---------------------------------------------------------------------------------
SQUASHFS_LAYER: Final = "application/vnd.sylabs.image.layer.v1.squashfs"
EXT3_LAYER: Final = "application/vnd.sylabs.image.layer.v1.ext3"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_TAR_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# -- Sylabs artifacts -------------------------------------------------------------------------
SIF_LAYER: Final = "application/vnd.sylabs.sif.layer.v1.sif"
SIF_CONFIG: Final = "application/vnd.sylabs.sif.config.v1+json"
DATA_CONTAINER: Final = "application/vnd.sylabs.data-container.v1"

# ggcr MediaType.IsIndex / IsImage: what SingularityCE accepts as an index or an image.
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})


def is_index(media_type: object) -> bool:
    return isinstance(media_type, str) and media_type in INDEX_TYPES


def is_image_manifest(media_type: object) -> bool:
    return isinstance(media_type, str) and media_type in IMAGE_MANIFEST_TYPES
