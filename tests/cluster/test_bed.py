"""The test bed itself: three nodes with their own identity, one shared filesystem, the
project's Prolog/Epilog on every node, and the failure primitives the lease tests use."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.cluster.conftest import NODES, REPO, Bed

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.slow]

CONNECT_N1_SLURMD = ("timeout", "3", "bash", "-c", "exec 3<>/dev/tcp/10.79.3.11/7918")


def test_nodes_have_their_own_identity_and_share_the_filesystem(bed: Bed) -> None:
    out = bed.run("srun", "-N3", "sh", "-c", "echo $(hostname) $(cat /proc/sys/kernel/random/boot_id)")
    assert out.returncode == 0, out.stderr
    seen = dict(line.split() for line in out.stdout.splitlines())
    assert sorted(seen) == list(NODES)
    assert len(set(seen.values())) == 3  # one boot_id per node
    host_boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert host_boot not in seen.values()
    marker = bed.state_dir / "bed-selftest"
    try:
        assert bed.on_node("n1", "sh", "-c", f"echo from-n1 > {marker}").returncode == 0
        assert bed.on_node("n3", "cat", str(marker)).stdout == "from-n1\n"  # shared
    finally:
        marker.unlink(missing_ok=True)
    # runtime_dir is a tmpfs of each node's own: what n1 puts there, n2 does not see
    assert bed.on_node("n1", "touch", str(bed.runtime_dir / "only-n1")).returncode == 0
    assert bed.on_node("n2", "test", "-e", str(bed.runtime_dir / "only-n1")).returncode == 1
    assert not (bed.runtime_dir / "only-n1").exists()


def test_kill_and_boot_give_a_new_boot_id(bed: Bed) -> None:
    before = bed.on_node("n2", "cat", "/proc/sys/kernel/random/boot_id").stdout
    assert bed.dev("node", "kill", "n2").returncode == 0
    assert bed.on_node("n2", "true").returncode != 0  # nothing of n2 is left
    assert bed.dev("node", "boot", "n2").returncode == 0
    after = bed.on_node("n2", "cat", "/proc/sys/kernel/random/boot_id").stdout
    assert before and after and before != after
    uptime = float(bed.on_node("n2", "cut", "-d ", "-f1", "/proc/uptime").stdout)
    assert uptime < 30


def test_freeze_stops_every_process_and_thaw_resumes(bed: Bed) -> None:
    assert bed.dev("node", "freeze", "n3").returncode == 0
    try:
        pids = bed.run("ip", "netns", "pids", "sifomn-n3").stdout.split()
        states = {open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] for p in pids}
        assert states == {"T"}
    finally:
        assert bed.dev("node", "thaw", "n3").returncode == 0
    assert bed.run("srun", "-w", "n3", "hostname", timeout=60).stdout == "n3\n"


def test_cut_isolates_the_node_and_heal_restores_it(bed: Bed) -> None:
    assert bed.dev("node", "cut", "n1").returncode == 0
    try:
        ping = bed.on_node("n2", *CONNECT_N1_SLURMD, timeout=30)
        assert ping.returncode == 124, ping.stderr  # silently dropped: the connect hangs
    finally:
        assert bed.dev("node", "heal", "n1").returncode == 0
    ping = bed.on_node("n2", *CONNECT_N1_SLURMD, timeout=30)
    assert ping.returncode == 0, ping.stderr


def bed_leftovers() -> list[str]:
    """Everything of the test bed that `down` must remove: namespaces, links, processes."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    procs = subprocess.run(["pgrep", "-f", "sifomn-node-|/run/slurm-sifomn/munge"], capture_output=True,
                           text=True).stdout
    found = [line.split()[0] for line in netns.splitlines() if line.startswith("sifomn-")]
    found += [word.rstrip(":").split("@")[0] for word in links.split() if word.startswith(("sifomn-br", "sifomnv-"))]
    return found + [f"pid {p}" for p in procs.split()]


def test_up_and_down_from_any_state(bed: Bed) -> None:
    """up twice, down twice, down after an up killed half-way, and up again: always clean.
    Runs the bed's own script (the package is already installed by the session fixture)."""
    nodes_script = str(REPO / "slurm_plugin" / "dev-cluster-nodes")

    def timed(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = subprocess.run([nodes_script, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        return done, time.monotonic() - started

    again, t_again = timed("up", "3")  # already up: nothing to do
    assert again.returncode == 0, again.stderr
    down, t_down = timed("down")
    assert down.returncode == 0, down.stderr
    assert bed_leftovers() == []
    down2, t_down2 = timed("down")
    assert down2.returncode == 0 and bed_leftovers() == []
    half = subprocess.run(["timeout", "-s", "KILL", "1", nodes_script, "up", "3"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert half.returncode in (137, -9)  # SIGKILL (timeout signals its own process group too)
    assert bed_leftovers() != []  # half-way: some links, namespaces or daemons exist
    down3, t_down3 = timed("down")
    assert down3.returncode == 0, down3.stderr
    assert bed_leftovers() == []
    up, t_up = timed("up", "3")
    assert up.returncode == 0, up.stderr
    assert sorted(bed.run("srun", "-N3", "hostname").stdout.split()) == list(NODES)
    print(f"bed: up (from nothing) {t_up:.1f}s, up again {t_again:.1f}s, down {t_down:.1f}s, "
          f"down again {t_down2:.2f}s, down after a killed up {t_down3:.1f}s")
