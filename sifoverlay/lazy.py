"""Packages that load their submodules on first use (issue 17: a short-lived process such as
a no-op `overlay sync`, a status answered from its memo, or the job user's copy-up child
must not import the whole package).

`make_lazy(package_name, names)`: each name of `names` (name -> submodule) is loaded from
its submodule on first access of the package attribute; any other attribute that is a
submodule is imported as eager loading made it available. A name that is both a submodule
and a function (`engine.status`, `runtime.assemble`) stays the function, as when the
package bound it eagerly; the submodule is in sys.modules under its full name.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any


def make_lazy(package: str, names: Mapping[str, str]) -> None:
    lazy = dict(names)

    class _Lazy(types.ModuleType):
        def __getattr__(self, name: str) -> Any:  # only for names not bound yet
            where = lazy.get(name)
            if where is None:  # a submodule nobody imported yet
                try:
                    return importlib.import_module(f"{package}.{name}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"{package}.{name}":
                        raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(f"{package}.{where}"), name)
            super().__setattr__(name, value)
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            if isinstance(value, types.ModuleType) and name in lazy:
                return  # the import system binding a submodule of that name: the function keeps it
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Lazy
