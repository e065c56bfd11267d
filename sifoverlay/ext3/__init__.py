"""ext3 overlay filesystems as byte ranges: superblock fingerprint, SingularityCE header
check, creation, journal replay + fsck as an unprivileged process (no loop device),
hole-aware hashing.

Knows nothing of SIF: everything works on (fd or path, offset, size).
"""

from .fsck import FsckResult, replay_and_fsck
from .hashing import DEFAULT_BUF, hash_range
from .mkfs import MIN_OVERLAY_MIB, make_overlay_fs
from .superblock import (
    FINGERPRINT_KEYS,
    HEADER_BYTES,
    Ext3Usage,
    Superblock,
    check_header,
    check_region_header,
    free_bytes,
    usage,
)
from .tools import LoopBinding, attach_loop, detach_loop, loop_binding, loop_device, run_tool, serves

__all__ = [
    "DEFAULT_BUF",
    "FINGERPRINT_KEYS",
    "HEADER_BYTES",
    "MIN_OVERLAY_MIB",
    "Ext3Usage",
    "FsckResult",
    "LoopBinding",
    "Superblock",
    "attach_loop",
    "check_header",
    "check_region_header",
    "detach_loop",
    "free_bytes",
    "hash_range",
    "loop_binding",
    "loop_device",
    "make_overlay_fs",
    "replay_and_fsck",
    "run_tool",
    "serves",
    "usage",
]
