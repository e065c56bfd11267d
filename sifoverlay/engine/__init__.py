"""The reconcile engine: overlay create / sync / seal / status and crash recovery.

Every mutation of an image goes through `engine.commit` (journaled, one metadata write as
commit point) and the `io` seam. 
"""

from __future__ import annotations

__all__ = [
    "OpResult",
    "RecoverOutcome",
    "Status",
    "SyncResult",
    "create_overlay",
    "recover",
    "seal",
    "status",
    "sync",
]

# Eager on purpose: `status`, `recover` and `seal` are both submodules and functions, and
# binding the functions after the submodules are loaded keeps `engine.status(...)` callable.
# The submodules keep their heavy imports (ext3 tools, subprocess) inside functions.
from .commit import OpResult  # noqa: E402
from .create import create_overlay  # noqa: E402
from .reconcile import SyncResult, sync  # noqa: E402
from .recover import RecoverOutcome, recover  # noqa: E402
from .seal import seal  # noqa: E402
from .status import Status, status  # noqa: E402
