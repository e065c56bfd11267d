"""The test bed itself: three nodes with their own identity, one shared filesystem, the
project's Prolog/Epilog on every node, and the failure primitives the lease tests use."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import NODES, Bed

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
