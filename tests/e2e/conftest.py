"""End-to-end tests: the README demo and the soak, through the real local Slurm.

Both need root and the dev cluster; they never take the cluster down (it is shared with
tests/slurm and may have been started by scripts/test.sh)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, require_root, require_tool


@pytest.fixture
def e2e_ready() -> None:
    require_root()
    require_tool("sbatch", "squeue", "scancel", "scontrol", "jq", "curl", "debugfs", "mkfs.ext3", "fuse2fs",
                 "fuse-overlayfs", "squashfuse", str(REPO / "slurm_plugin" / "dev-cluster"))
