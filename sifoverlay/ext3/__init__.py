"""ext3 overlay filesystems as byte ranges: superblock fingerprint, SingularityCE header
check, creation, journal replay + fsck as an unprivileged process (no loop device),
hole-aware hashing.

Knows nothing of SIF: everything works on (fd or path, offset, size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sifoverlay import lazy_getattr

if TYPE_CHECKING:
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

# Lazy (issue 17, fast CLI): the superblock read of a no-op `overlay sync` must not load
# fsck, mkfs and the loop tools (subprocess, signal). Each name of __all__ comes from its
# submodule on first use; type checkers see the imports above.
_LAZY = {
    "FsckResult": "fsck", "replay_and_fsck": "fsck", "DEFAULT_BUF": "hashing", "hash_range": "hashing",
    "MIN_OVERLAY_MIB": "mkfs", "make_overlay_fs": "mkfs",
    **dict.fromkeys(["FINGERPRINT_KEYS", "HEADER_BYTES", "Ext3Usage", "Superblock", "check_header",
                     "check_region_header", "free_bytes", "usage"], "superblock"),
    **dict.fromkeys(["LoopBinding", "attach_loop", "detach_loop", "loop_binding", "loop_device", "run_tool",
                     "serves"], "tools"),
}

if not TYPE_CHECKING:  # hidden from mypy, which would type every unknown name as Any
    __getattr__ = lazy_getattr(__name__, _LAZY, globals())


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
