"""oci-sif-overlay: crash-safe writable overlays for SingularityCE OCI-SIF images."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__version__ = "0.1.0"


def lazy_getattr(package: str, names: Mapping[str, str | None], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package` that imports on first use: a name listed in
    `names` from its submodule, any other name as a submodule of that name (what eager
    loading used to bind). The value is cached in the package's `namespace`, so the hook
    runs once per name. Keeps ``sifoverlay --help`` and a no-op sync from importing what
    they never call."""
    import importlib

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is not None:
            value = getattr(importlib.import_module(f"{package}.{where}"), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    return __getattr__
