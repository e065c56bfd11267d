"""A real single-node Slurm (slurm_plugin/dev-cluster) for the whole session, test users,
and OCI-SIF images made with the project's own import + overlay create.

Jobs run as non-root users created here (jobs as root would hide every permission bug).
After each cluster test the node must be idle, never drained: a drained node fails the
test that caused it (and is resumed so the next test can run).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root, require_tool

DEV_CLUSTER = REPO / "slurm_plugin" / "dev-cluster"
TEST_USERS = ("sifo-slurm-alice", "sifo-slurm-bob")
USER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
JOB_DONE_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def sh(*argv: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout, env=env,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass
class Cluster:
    host: str
    image_root: Path
    journal_dir: Path
    runtime_dir: Path

    # -- submitting as a user ---------------------------------------------------------------
    def as_user(self, user: User, *argv: str, timeout: float = 120, env: dict[str, str] | None = None,
                cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = [f"{k}={v}" for k, v in {**USER_ENV, **(env or {})}.items()]
        cmd = ["runuser", "-u", user.name, "--", "env", "-i", *extra]
        if cwd:
            cmd += ["sh", "-c", 'cd "$0" && exec "$@"', cwd]
        return sh(*cmd, *argv, check=False, timeout=timeout)

    def sbatch(self, user: User, *args: str, env: dict[str, str] | None = None) -> int:
        done = self.as_user(user, "sbatch", "--parsable", *args, env=env)
        assert done.returncode == 0, f"sbatch failed ({done.returncode}): {done.stderr}"
        return int(done.stdout.strip().split(";")[0])

    # -- job and node state -----------------------------------------------------------------
    def job_fields(self, job: int) -> dict[str, str]:
        done = sh("scontrol", "show", "job", "-o", str(job), check=False)
        fields: dict[str, str] = {}
        for word in done.stdout.split():
            key, eq, value = word.partition("=")
            if eq:
                fields.setdefault(key, value)
        return fields

    def job_state(self, job: int) -> str:
        return self.job_fields(job).get("JobState", "UNKNOWN")

    def wait_state(self, job: int, states: set[str], timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job} is {state}, not one of {sorted(states)} after {timeout}s")

    def wait_finished(self, job: int, timeout: float = 120) -> str:
        """Until the job is done AND its Epilog has run (node no longer completing it)."""
        state = self.wait_state(job, JOB_DONE_STATES, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            squeue = sh("squeue", "-h", "-j", str(job), "-t", "all", "-o", "%T", check=False).stdout.split()
            if "COMPLETING" not in self.job_fields(job).get("JobState", "") and "COMPLETING" not in squeue:
                self.wait_job_end(job, deadline)
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job}: Epilog did not finish in {timeout}s")

    def wait_job_end(self, job: int | None, deadline: float) -> None:
        """A rw job's end goes on after its Epilog (epilog_reconcile=async): wait until no
        process (its reconcile worker) holds the job-end lock of `job` (None: of any job)."""
        from sifoverlay.slurm.endlock import in_progress

        while time.monotonic() < deadline:
            if not in_progress(str(self.journal_dir), "" if job is None else str(job)):
                return
            time.sleep(0.1)
        raise AssertionError(f"job {job if job is not None else '(any)'}: its end is still in progress (reconcile worker)")

    def settle(self, timeout: float = 120, *, cancel: bool = True) -> None:
        """Wait until no test job is completing (Epilogs done); with `cancel`, cancel the
        test users' jobs first and wait until none is left at all."""
        busy = {"COMPLETING", "CONFIGURING"} | ({"PENDING", "RUNNING", "SUSPENDED"} if cancel else set())
        if cancel:
            for name in TEST_USERS:
                sh("scancel", "-u", name, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = sh("squeue", "-h", "-u", ",".join(TEST_USERS), "-t", "all", "-o", "%T", check=False).stdout.split()
            if not busy.intersection(left):
                self.wait_job_end(None, deadline)
                return
            time.sleep(0.3)
        raise AssertionError(f"test jobs still not finished after {timeout}s")

    def foreign_jobs(self) -> list[str]:
        """Active jobs of users other than the test users (the cluster may be shared, e.g.
        with bench/ scripts): tests that would disturb them skip, idle checks relax."""
        out = sh("squeue", "-h", "-o", "%i %u %T", check=False).stdout.split("\n")
        active = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}
        return [line.split()[0] for line in out
                if len(line.split()) == 3 and line.split()[1] not in TEST_USERS and line.split()[2] in active]

    def node_state(self) -> str:
        """slurmctld's state of the node, lower case ("idle", "mixed", "drained"). From
        `scontrol show node` (as tests/cluster's Bed), not `sinfo -o %T`, which kept printing
        "mixed" after jobs with GRES had ended while slurmctld had the node IDLE."""
        shown = sh("scontrol", "-o", "show", "node", self.host, check=False).stdout
        state = next((f.split("=", 1)[1] for f in shown.split() if f.startswith("State=")), "")
        return state.lower()

    def session_path(self, job: int) -> Path:
        """The Prolog's session of `job` on this node (one per job and node, issue 13)."""
        import socket

        from sifoverlay.engine import sessions

        return Path(sessions.session_path(self.journal_dir, str(job), host=socket.gethostname()))


def _ensure_user(name: str) -> User:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        sh("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh",
           "--user-group", name)
        entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="session")
def slurm_users() -> tuple[User, User]:
    require_root()
    return tuple(_ensure_user(n) for n in TEST_USERS)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def cluster(slurm_users: tuple[User, User]) -> Iterator[Cluster]:
    require_root()
    require_tool("slurmctld", "slurmd", "sbatch", "munged", "gcc", "fuse2fs", "squashfuse", "fuse-overlayfs")
    was_up = sh(str(DEV_CLUSTER), "status", check=False).stdout.count("running") == 3
    done = sh(str(DEV_CLUSTER), "up", check=False, timeout=600)
    assert done.returncode == 0, f"dev-cluster up failed: {done.stderr[-2000:]}"
    from sifoverlay.slurm.config import load_config

    config = load_config()
    assert config.image_roots, "dev-cluster must configure image_roots"
    yield Cluster(host=os.uname().nodename.split(".")[0], image_root=Path(config.image_roots[0]),
                  journal_dir=Path(config.journal_dir), runtime_dir=Path(config.runtime_dir))
    if not was_up:  # leave a cluster somebody else started (the demo) running
        sh(str(DEV_CLUSTER), "down", "--single", check=False)


@pytest.fixture(autouse=True)
def node_stays_idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every cluster test: cancel the test users' leftovers, then the node must be
    idle (not drained). A drain fails the test and is resumed for the next one."""
    yield
    if "cluster" not in request.fixturenames:
        return
    cluster: Cluster = request.getfixturevalue("cluster")
    cluster.settle()
    deadline = time.monotonic() + 120
    state = reason = ""
    while time.monotonic() < deadline:
        state = cluster.node_state()
        if state == "idle" or (state.rstrip("-") in ("mixed", "allocated", "completing") and cluster.foreign_jobs()):
            return  # idle, or busy only with other users' jobs (a shared cluster)
        if "drain" in state or "down" in state:
            reason = sh("sinfo", "-h", "-N", "-n", cluster.host, "-o", "%E", check=False).stdout.strip()
            if "prolog" in reason.lower() or "epilog" in reason.lower() or "drain" in state:
                sh("scontrol", "update", f"NodeName={cluster.host}", "State=RESUME", check=False)
                pytest.fail(f"node {cluster.host} is {state} after the test (reason: {reason})")
            # "down*, Not responding": slurmd is restarting (another user of a shared
            # cluster may kill it on purpose); it comes back by itself (ReturnToService=2)
        time.sleep(0.5)
    pytest.fail(f"node {cluster.host} is {state} ({reason or 'no reason'}), not idle, 120 s after the test")


# -- images ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def imported_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-static imported as an OCI-SIF with `sifoverlay import` (no overlay yet): the
    OCI layout from scripts/busybox-layout.py, as the demo makes it."""
    work = tmp_path_factory.mktemp("slurm-base")
    out = work / "busybox.oci.sif"
    done = sh(sys.executable, str(REPO / "scripts" / "busybox-layout.py"), str(work / "layout"), check=False)
    assert done.returncode == 0, done.stderr
    done = sh(str(REPO / ".venv/bin/sifoverlay"), "import", str(work / "layout"), str(out), check=False)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def base_images(imported_image: Path) -> dict[int, Path]:
    return {}


def _base_for(owner: User, imported: Path, cache: dict[int, Path]) -> Path:
    """The imported image plus a 64 MiB sparse ext3 overlay whose upper/ and work/ belong
    to `owner` (as `sifoverlay overlay create` run by that user makes them). Once per user."""
    if owner.uid not in cache:
        require_tool("mkfs.ext3")
        from sifoverlay.engine import create_overlay

        target = imported.parent / f"busybox-{owner.uid}.oci.sif"
        sh("cp", "--sparse=always", str(imported), str(target))
        create_overlay(target, size_mib=64, sparse=True, uid=owner.uid, gid=owner.gid,
                       journal_dir=str(imported.parent / "journal"))
        cache[owner.uid] = target
    return cache[owner.uid]


@pytest.fixture
def image_dir(cluster: Cluster) -> Iterator[Path]:
    """A fresh directory below the configured image root, removed afterwards."""
    path = cluster.image_root / f"t-{uuid.uuid4().hex[:10]}"
    path.mkdir(mode=0o755)
    yield path
    cluster.settle()  # srun returns before the Epilog ends: let it finish with the image
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_image(imported_image: Path, base_images: dict[int, Path], image_dir: Path):  # type: ignore[no-untyped-def]
    """make_image(owner, name="img.oci.sif", mode=0o644) -> a fresh copy owned by `owner`."""

    def make(owner: User, name: str = "img.oci.sif", mode: int = 0o644, where: Path | None = None) -> Path:
        target = (where or image_dir) / name
        sh("cp", "--sparse=always", str(_base_for(owner, imported_image, base_images)), str(target))
        os.chown(target, owner.uid, owner.gid)
        os.chmod(target, mode)
        return target

    return make
