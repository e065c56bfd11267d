"""The multi-node test bed (`slurm_plugin/dev-cluster up --nodes 3`: a controller and three
slurmd nodes n1..n3, each in its own network/UTS/IPC/mount/time namespaces, one shared
filesystem) for tests/cluster/, with the project's package, Prolog/Epilog and SPANK plugin
on every node.

Fixtures:
  bed          session: the running test bed (brought up here if it is not; taken down
               at the end only if this session brought it up)
  bed_users    the two non-root test users (same as tests/slurm)
  bed_image    make_image(owner, name=..., mode=...) -> a fresh busybox OCI-SIF with a
               64 MiB ext3 overlay, owned by `owner`, in a per-test directory below the
               test bed's (shared) image root
After every test the test users' jobs are cancelled, frozen nodes thawed, cut nodes
healed, killed nodes booted, and all nodes must come back idle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root, require_tool
from tests.slurm.conftest import (  # noqa: F401  (fixtures, re-exported for tests/cluster)
    JOB_DONE_STATES,
    TEST_USERS,
    USER_ENV,
    User,
    _base_for,
    base_images,
    imported_image,
    sh,
    slurm_users,
)

DEV_CLUSTER = REPO / "slurm_plugin" / "dev-cluster"
NODES = ("n1", "n2", "n3")
BED_CONF = "/etc/slurm-sifomn/slurm.conf"


@dataclass
class Bed:
    """Client side of the test bed: every Slurm command runs with the bed's SLURM_CONF."""

    conf: str
    image_root: Path
    state_dir: Path
    runtime_dir: Path
    nodes: tuple[str, ...] = NODES
    env: dict[str, str] = field(default_factory=dict)

    # -- commands ---------------------------------------------------------------------------
    def run(self, *argv: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        """A client command (scontrol, squeue, sinfo, ...) as root against the test bed."""
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, env=self.env,
                              stdin=subprocess.DEVNULL)

    def dev(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """slurm_plugin/dev-cluster ARGS (node kill n2, node exec n1 CMD, ...)."""
        return self.run(str(DEV_CLUSTER), *args, timeout=timeout)

    def on_node(self, node: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command as root inside a node's namespaces."""
        return self.dev("node", "exec", node, *argv, timeout=timeout)

    def as_user(self, user: User, *argv: str, timeout: float = 120, env: dict[str, str] | None = None,
                cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = [f"{k}={v}" for k, v in {**USER_ENV, "SLURM_CONF": self.conf, **(env or {})}.items()]
        cmd = ["runuser", "-u", user.name, "--", "env", "-i", *extra]
        if cwd:
            cmd += ["sh", "-c", 'cd "$0" && exec "$@"', cwd]
        return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def sbatch(self, user: User, *args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> int:
        done = self.as_user(user, "sbatch", "--parsable", *args, env=env, cwd=cwd)
        assert done.returncode == 0, f"sbatch failed ({done.returncode}): {done.stderr}"
        return int(done.stdout.strip().split(";")[0])

    # -- jobs ------------------------------------------------------------------------------
    def job_fields(self, job: int | str) -> dict[str, str]:
        fields: dict[str, str] = {}
        for word in self.run("scontrol", "show", "job", "-o", str(job)).stdout.split():
            key, eq, value = word.partition("=")
            if eq:
                fields.setdefault(key, value)
        return fields

    def job_state(self, job: int | str) -> str:
        return self.job_fields(job).get("JobState", "UNKNOWN")

    def wait_state(self, job: int | str, states: set[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job} is {state}, not one of {sorted(states)} after {timeout}s")

    def wait_finished(self, job: int | str, timeout: float = 180) -> str:
        """Until the job (every array task) is done and no node is still completing it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("squeue", "-h", "-j", str(job), "-t", "all", "-o", "%T").stdout.split()
            if (states and all(s in JOB_DONE_STATES for s in states)) or (
                    not states and self.job_state(job) in JOB_DONE_STATES):
                self.wait_job_end(job, deadline)
                return self.job_state(job)
            time.sleep(0.3)
        raise AssertionError(f"job {job} not finished after {timeout}s: {self.run('squeue', '-j', str(job)).stdout}")

    def wait_job_end(self, job: int | str, deadline: float) -> None:
        """A rw job's end goes on after its Epilog (epilog_reconcile=async): wait until no
        process (its reconcile worker, on any node) holds the job-end lock of `job`."""
        from sifoverlay.slurm.endlock import in_progress

        while time.monotonic() < deadline:
            if not in_progress(str(self.state_dir / "journal"), str(job)):
                return
            time.sleep(0.1)
        raise AssertionError(f"job {job}: its end is still in progress (reconcile worker)")

    def accounting(self, job: int | str) -> list[dict[str, str]]:
        """One dict per job record of `job` (array tasks included), from scontrol."""
        out = self.run("scontrol", "show", "job", "-o", str(job)).stdout
        rows = []
        for line in out.splitlines():
            row: dict[str, str] = {}
            for word in line.split():
                key, eq, value = word.partition("=")
                if eq:
                    row.setdefault(key, value)
            if row:
                rows.append(row)
        return rows

    # -- nodes ----------------------------------------------------------------------------
    def node_state(self, node: str) -> str:
        """slurmctld's state of the node, lower case ("idle", "mixed", "down+not_responding").
        From `scontrol show node`, not `sinfo -o %T`: after a node kill + boot, sinfo kept
        printing "mixed" for minutes while slurmctld had State=IDLE CPUAlloc=0 and no job."""
        shown = self.run("scontrol", "-o", "show", "node", node).stdout
        state = next((f.split("=", 1)[1] for f in shown.split() if f.startswith("State=")), "")
        return state.lower()

    def mounts(self, node: str) -> str:
        """The node's mount table (what a double-mount monitor samples)."""
        return self.on_node(node, "cat", "/proc/self/mountinfo").stdout

    def reset(self, timeout: float = 180) -> None:
        """Back to a quiet bed: test users' jobs cancelled, every node thawed, healed and
        running, and all nodes idle (DOWN/DRAIN nodes resumed)."""
        for name in TEST_USERS:
            self.run("scancel", "-u", name)
        for node in self.nodes:
            self.dev("node", "thaw", node)
            self.dev("node", "heal", node)
            self.dev("node", "boot", node)
        deadline = time.monotonic() + timeout
        no_jobs_since: float | None = None
        while time.monotonic() < deadline:
            left = self.run("squeue", "-h", "-u", ",".join(TEST_USERS), "-o", "%T").stdout.split()
            states = {n: self.node_state(n) for n in self.nodes}
            if not left and all(s == "idle" for s in states.values()):
                return
            for node, state in states.items():
                if any(bad in state for bad in ("down", "drain", "fail")):
                    self.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
            # Last resort for a node that stays busy with no job at all on the bed for 30 s
            # (a stale allocation): set it DOWN and resume it.
            busy = self.run("squeue", "-h", "-o", "%i").stdout.split()
            now = time.monotonic()
            no_jobs_since = (no_jobs_since or now) if not busy else None
            if no_jobs_since is not None and now - no_jobs_since > 30:
                for node, state in states.items():
                    if state != "idle":
                        self.run("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=bed-reset")
                        self.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
                no_jobs_since = None
            time.sleep(0.5)
        every_job = self.run("squeue", "-h", "-o", "%i %u %T %N %r").stdout.strip()
        nodes = {n: self.run("scontrol", "show", "node", n).stdout.split("\n")[:12] for n in self.nodes
                 if states.get(n) != "idle"}
        raise AssertionError(f"test bed not idle after {timeout}s: {states}, jobs left: {left}; "
                             f"all jobs: {every_job!r}; {nodes}")


def _bed_is_up() -> bool:
    return subprocess.run([str(DEV_CLUSTER), "status", "--multi"], capture_output=True,
                          stdin=subprocess.DEVNULL).returncode == 0


@pytest.fixture(scope="session")
def bed_users(slurm_users: tuple[User, User]) -> tuple[User, User]:
    return slurm_users


@pytest.fixture(scope="session")
def bed(bed_users: tuple[User, User]) -> Iterator[Bed]:
    require_root()
    require_tool("slurmctld", "slurmd", "sbatch", "munged", "iptables", "nsenter", "fuse2fs", "squashfuse",
                 "fuse-overlayfs")
    was_up = _bed_is_up()
    started = time.monotonic()
    done = subprocess.run([str(DEV_CLUSTER), "up", "--nodes", str(len(NODES))], capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"dev-cluster up --nodes {len(NODES)} failed: {done.stderr[-3000:]}"
    print(f"test bed up in {time.monotonic() - started:.1f}s (was up: {was_up})")
    from sifoverlay.slurm.config import load_config

    config = load_config(env={"SLURM_CONF": BED_CONF})
    bed = Bed(conf=BED_CONF, image_root=Path(config.image_roots[0]), state_dir=Path(config.state_dir),
              runtime_dir=Path(config.runtime_dir), env={**os.environ, "SLURM_CONF": BED_CONF})
    yield bed
    if not was_up:
        subprocess.run([str(DEV_CLUSTER), "down", "--multi"], capture_output=True, timeout=300,
                       stdin=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def bed_recovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test bed test: leftovers cancelled, nodes back and idle."""
    yield
    if "bed" in request.fixturenames:
        request.getfixturevalue("bed").reset()


@pytest.fixture
def bed_dir(bed: Bed) -> Iterator[Path]:
    """A fresh directory below the test bed's image root (shared by all nodes)."""
    path = bed.image_root / f"t-{uuid.uuid4().hex[:10]}"
    path.mkdir(mode=0o755)
    yield path
    bed.reset()  # Epilogs done before the images go
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bed_out(bed_dir: Path) -> Path:
    """A directory every test user can write job output to (shared by all nodes)."""
    path = bed_dir / "out"
    path.mkdir()
    path.chmod(0o1777)
    return path


def overlay_status(image: Path) -> str:
    """First line of `sifoverlay overlay status IMAGE` ('<image>: clean' when reconciled)."""
    done = sh(str(REPO / ".venv/bin/sifoverlay"), "overlay", "status", str(image), check=False)
    return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else ""


@pytest.fixture
def bed_image(imported_image: Path, base_images: dict[int, Path], bed_dir: Path) -> Callable[..., Path]:
    """bed_image(owner, name="img.oci.sif", mode=0o644) -> a fresh image owned by `owner`."""

    def make(owner: User, name: str = "img.oci.sif", mode: int = 0o644) -> Path:
        target = bed_dir / name
        sh("cp", "--sparse=always", str(_base_for(owner, imported_image, base_images)), str(target))
        os.chown(target, owner.uid, owner.gid)
        os.chmod(target, mode)
        return target

    return make
