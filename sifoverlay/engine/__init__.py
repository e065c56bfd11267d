"""The reconcile engine: overlay create / sync / seal / status and crash recovery.

Every mutation of an image goes through `engine.commit` (journaled, one metadata write as
commit point) and the `io` seam. 
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sifoverlay.lazy import make_lazy

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

if TYPE_CHECKING:
    from .commit import OpResult
    from .create import create_overlay
    from .reconcile import SyncResult, sync
    from .recover import RecoverOutcome, recover
    from .seal import seal
    from .status import Status, status

# Lazy (issue 17, fast CLI): `import sifoverlay.engine.reconcile` for a no-op `overlay
# sync` must not load create, seal, recover and commit with their imports. Each name of
# __all__ is loaded from its submodule on first use. `status`, `recover` and `seal` are
# both submodules and functions: the package attribute stays the function (as when this
# module bound them eagerly), so `engine.status(...)` is callable whichever was imported
# first; the submodules are in sys.modules under their full names.
_LAZY = {
    "OpResult": "commit",
    "create_overlay": "create",
    "SyncResult": "reconcile",
    "sync": "reconcile",
    "RecoverOutcome": "recover",
    "recover": "recover",
    "seal": "seal",
    "Status": "status",
    "status": "status",
}


make_lazy(__name__, _LAZY)
