"""Capacity of an overlay image: free bytes and inodes of the ext3 (from its superblock:
1 KiB of bytes parsed here, nothing mounted, no tool run), free SIF descriptor slots, and
the pre-flight that refuses a read-write job which could not end in a commit.

Descriptor slots one commit needs at once (new objects are added before the replaced
ones are freed, docs/format.md §2), counted in engine.plan:
  sync     4: config, manifest, root index, revision history (3 when only the
             fingerprint is refreshed: the config is unchanged);
  create   5: ext3, config, manifest, root index, history;
  seal     5: squashfs, config, manifest, root index, history;
  resize   5: ext3 (the grown copy), config, manifest, root index, history;
  compact  4: as sync.
A job's end is a sync, so a rw job needs SLOTS_PER_SYNC free slots when it starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sifoverlay.errors import CapacityError

SLOTS_PER_SYNC = 4
SLOTS_NEEDED = {"sync": 4, "compact": 4, "create": 5, "seal": 5, "resize": 5}


@dataclass(frozen=True, slots=True)
class Capacity:
    overlay_size: int  # bytes of the ext3 region
    fs_bytes: int  # blocks_count * block_size
    free_bytes: int  # free blocks * block size (root-reserved blocks included)
    available_bytes: int  # free minus reserved: what a non-root job can still write
    free_inodes: int
    inodes: int
    descriptors_free: int
    descriptors_total: int
    slots_per_sync: int = SLOTS_PER_SYNC

    @property
    def used_fraction(self) -> float:
        return 0.0 if self.fs_bytes <= 0 else 1.0 - self.free_bytes / self.fs_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "overlay_size": self.overlay_size, "fs_bytes": self.fs_bytes, "free_bytes": self.free_bytes,
            "available_bytes": self.available_bytes, "free_inodes": self.free_inodes, "inodes": self.inodes,
            "descriptors_free": self.descriptors_free, "descriptors_total": self.descriptors_total,
            "slots_per_sync": self.slots_per_sync, "used_fraction": round(self.used_fraction, 6),
        }


def capacity_of(img: Any) -> Capacity:
    """Capacity of an open OciSifImage with an overlay (OverlayStateError without one)."""
    from sifoverlay.errors import Ext3FormatError
    from sifoverlay.ext3.superblock import Superblock

    overlay = img.require_overlay()
    try:
        sb = Superblock.read(img.sif.fd, overlay.offset, size=overlay.size)
    except Ext3FormatError as exc:  # name the image, not the fd
        raise Ext3FormatError(img.path, f"ext3 overlay at offset {overlay.offset}: {exc.problem}") from None
    header = img.sif.header
    return Capacity(
        overlay_size=overlay.size, fs_bytes=int(sb.blocks_count) * int(sb.block_size), free_bytes=sb.free_bytes,
        available_bytes=sb.usage.available_bytes, free_inodes=sb.free_inodes, inodes=sb.inodes_count,
        descriptors_free=sum(1 for d in img.sif.descriptors if not d.is_used),
        descriptors_total=header.descriptors_total,
    )


def read_capacity(image: str, fd: int) -> Capacity:
    """Capacity through the caller's checked descriptor of `image`."""
    from sifoverlay.ocisif import open_image
    from sifoverlay.sif.load import SifFile

    with open_image(SifFile.from_fd(os.dup(fd), image)) as img:
        return capacity_of(img)


def preflight(image: str, fd: int, *, min_free_bytes: int = 0, min_free_inodes: int = 0) -> Capacity:
    """Refuse (CapacityError, one line) a read-write job whose end could not be committed
    (fewer than SLOTS_PER_SYNC free descriptor slots) or that starts on an overlay with
    less than `min_free_bytes` available / `min_free_inodes` free inodes."""
    cap = read_capacity(image, fd)
    if cap.descriptors_free < SLOTS_PER_SYNC:
        raise CapacityError(image, f"only {cap.descriptors_free} free SIF descriptor slots, the sync at job end "
                            f"needs {SLOTS_PER_SYNC}: seal the overlay or rebuild the image with more slots",
                            needed=SLOTS_PER_SYNC, free=cap.descriptors_free)
    if min_free_bytes and cap.available_bytes < min_free_bytes:
        raise CapacityError(image, f"overlay has {cap.available_bytes} bytes free, less than the required "
                            f"{min_free_bytes} (min_free): grow it with `sifoverlay overlay resize` or compact it",
                            needed=min_free_bytes, free=cap.available_bytes)
    if min_free_inodes and cap.free_inodes < min_free_inodes:
        raise CapacityError(image, f"overlay has {cap.free_inodes} free inodes, less than the required "
                            f"{min_free_inodes}", needed=min_free_inodes, free=cap.free_inodes)
    return cap
