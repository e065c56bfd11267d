"""oci-sif-overlay: crash-safe writable overlays for SingularityCE OCI-SIF images."""

__version__ = "0.1.0"
