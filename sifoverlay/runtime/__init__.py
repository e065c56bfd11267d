"""Job runtime: assemble a rootfs from an OCI-SIF (FUSE as the job user by default, kernel
mounts as an admin opt-in), run commands inside it, tear it down, find leftovers.

Public API (docs/architecture.md): `assemble`, `teardown`, `find_leftovers`, `exec_in`,
`Rootfs`, and `run_embedded` for `sifoverlay exec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sifoverlay.lazy import make_lazy

__all__ = [
    "MODES",
    "Bind",
    "ExecOutcome",
    "Rootfs",
    "StartError",
    "TeardownReport",
    "User",
    "assemble",
    "default_base_dir",
    "exec_in",
    "find_leftovers",
    "run_embedded",
    "teardown",
]

if TYPE_CHECKING:
    from .assemble import MODES, Rootfs, TeardownReport, assemble, find_leftovers, teardown
    from .embedded import ExecOutcome, User, default_base_dir, run_embedded
    from .execute import Bind, StartError, exec_in

# Lazy (issue 17, job start): the job user's copy-up child (`python -m
# sifoverlay.runtime.copyup`, on every rw job's start) and the Prolog's imports of
# runtime.jobview/state must not load assemble, embedded and execute with their imports.
# `assemble` is both a submodule and a function: the package attribute stays the
# function, as when this module bound it eagerly (the submodule is in sys.modules).
_LAZY = {
    "MODES": "assemble", "Rootfs": "assemble", "TeardownReport": "assemble", "assemble": "assemble",
    "find_leftovers": "assemble", "teardown": "assemble",
    "ExecOutcome": "embedded", "User": "embedded", "default_base_dir": "embedded", "run_embedded": "embedded",
    "Bind": "execute", "StartError": "execute", "exec_in": "execute",
}


make_lazy(__name__, _LAZY)
