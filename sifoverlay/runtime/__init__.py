"""Job runtime: assemble a rootfs from an OCI-SIF (FUSE as the job user by default, kernel
mounts as an admin opt-in), run commands inside it, tear it down, find leftovers.

Public API (docs/architecture.md): `assemble`, `teardown`, `find_leftovers`, `exec_in`,
`Rootfs`, and `run_embedded` for `sifoverlay exec`.
"""

from __future__ import annotations

from .assemble import MODES, Rootfs, TeardownReport, assemble, find_leftovers, teardown
from .embedded import ExecOutcome, User, default_base_dir, run_embedded
from .execute import Bind, StartError, exec_in

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
