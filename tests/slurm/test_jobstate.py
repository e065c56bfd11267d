"""Job liveness against the real slurmctld: the CLI backend for real; the pyslurm backend
only where a pyslurm matching the running Slurm exists (never here: see the skip)."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest

from sifoverlay.slurm.jobstate import (
    JobState,
    PyslurmJobState,
    SlurmCliJobState,
    running_slurm_version,
    select_backend,
)
from tests.slurm.conftest import Cluster, User

pytestmark = [pytest.mark.slurm, pytest.mark.root]


def test_version_of_running_slurm(cluster: Cluster) -> None:
    version = running_slurm_version()
    assert version is not None and re.fullmatch(r"\d+\.\d+\.\d+", version)
    out = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, check=True).stdout
    assert version in out


def test_cli_backend_follows_a_job(cluster: Cluster, slurm_users: tuple[User, User]) -> None:
    backend = SlurmCliJobState()
    assert isinstance(backend, JobState)
    job = cluster.sbatch(slurm_users[0], "-o", "/dev/null", "--wrap", "sleep 30", env={})
    cluster.wait_state(job, {"RUNNING"})
    assert backend.is_alive(str(job)) is True
    subprocess.run(["scancel", str(job)], check=True)
    cluster.wait_finished(job)
    assert backend.is_alive(str(job)) is False
    assert backend.is_alive("987654321") is False  # never existed / purged


def test_cli_backend_scontrol_fallback(cluster: Cluster, slurm_users: tuple[User, User]) -> None:
    backend = SlurmCliJobState()
    backend.squeue = None  # as on a Slurm without squeue --json
    job = cluster.sbatch(slurm_users[0], "-o", "/dev/null", "--wrap", "sleep 30", env={})
    cluster.wait_state(job, {"RUNNING"})
    assert backend.is_alive(str(job)) is True
    subprocess.run(["scancel", str(job)], check=True)
    cluster.wait_finished(job)
    assert backend.is_alive(str(job)) is False
    assert backend.is_alive("987654321") is False


def test_unreachable_controller_is_unknown_not_dead(cluster: Cluster, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """squeue --json exits 0 with an errors list when slurmctld is unreachable: that must
    never read as 'the job is gone' (the sweeper would reconcile a running job)."""
    conf = Path("/etc/slurm/slurm.conf").read_text()
    bad = tmp_path / "slurm.conf"
    bad.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=1", conf))
    monkeypatch.setenv("SLURM_CONF", str(bad))
    backend = SlurmCliJobState(timeout=4)
    assert backend._from_squeue("1") is None
    assert backend.is_alive("1") is None


def test_select_backend_falls_back_to_cli_and_says_why(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    try:
        import pyslurm  # type: ignore[import-not-found]  # noqa: F401
        pytest.skip("pyslurm is installed here: the fallback is not observable")
    except ImportError:
        pass
    with caplog.at_level(logging.INFO, logger="sifoverlay.slurm.jobstate"):
        backend = select_backend()
    assert backend.name == "cli"
    assert "job state backend: cli (pyslurm is not importable" in caplog.text
    with caplog.at_level(logging.INFO, logger="sifoverlay.slurm.jobstate"):
        assert select_backend("cli").name == "cli"
    assert "job state backend: cli (asked for)" in caplog.text


def test_pyslurm_version_lock_reasons() -> None:
    class Fake:
        __version__ = "25.11.2"

        class Job:
            @staticmethod
            def load(job_id: int) -> object:
                raise RuntimeError("unused")

    import sys

    sys.modules["pyslurm"] = Fake  # type: ignore[assignment]
    try:
        backend, reason = PyslurmJobState.load("22.05.8")
        assert backend is None
        assert reason == "pyslurm 25.11.2 does not match Slurm 22.05.8 (pyslurm X.Y needs Slurm X.Y)"
        backend, reason = PyslurmJobState.load("25.11.7")
        assert backend is not None and reason == "pyslurm 25.11.2 matches Slurm 25.11.7"
    finally:
        del sys.modules["pyslurm"]


def _matching_pyslurm() -> PyslurmJobState:
    backend, reason = PyslurmJobState.load(running_slurm_version())
    if backend is None:
        pytest.skip(f"pyslurm backend not testable here: {reason}. pyslurm X.Y only builds against Slurm X.Y; "
                    "PyPI serves pyslurm 25.11.x and this node runs Debian's Slurm 22.05, so no pyslurm "
                    "matching it exists (docs/slurm.md, 'pyslurm')")
    return backend


def test_pyslurm_backend_follows_a_job(cluster: Cluster, slurm_users: tuple[User, User]) -> None:
    backend = _matching_pyslurm()
    job = cluster.sbatch(slurm_users[0], "-o", "/dev/null", "--wrap", "sleep 30", env={})
    cluster.wait_state(job, {"RUNNING"})
    assert backend.is_alive(str(job)) is True
    subprocess.run(["scancel", str(job)], check=True)
    cluster.wait_finished(job)
    assert backend.is_alive(str(job)) is False
    assert select_backend().name == "pyslurm"
