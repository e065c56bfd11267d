"""The reconcile engine: overlay create / sync / seal / status and crash recovery.

Every mutation of an image goes through `engine.commit` (journaled, one metadata write as
commit point) and the `io` seam. 
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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


class _Engine(types.ModuleType):
    def __getattr__(self, name: str) -> Any:  # only for names not bound yet
        where = _LAZY.get(name)
        if where is None:  # an engine submodule nobody imported yet, as eager loading made it available
            try:
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY:
            return  # the import system binding submodule status/recover/seal: the function keeps the name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine
