"""Helpers for H3's attack tests (issue 12 findings 1, 2, 5, 7, 8) against the real
Prolog/Epilog/sweeper on the dev cluster (tests/slurm/conftest.py), with the cluster's
unprivileged test users: alice is the attacker, bob the victim."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.security.h4_support import flipper_argv
from tests.slurm.conftest import JOB_DONE_STATES, Cluster, User, sh

PKG_PYTHON = "/opt/sifoverlay/bin/python"
JOB_LIMIT_MIN = 2  # --time of every attack job: each must end within it (+ Epilog)


@dataclass(frozen=True)
class Snapshot:
    sha256: str
    mtime_ns: int
    size: int


def snapshot(path: Path) -> Snapshot:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
    st = os.stat(path)
    return Snapshot(digest.hexdigest(), st.st_mtime_ns, st.st_size)


def user_dir(parent: Path, name: str, owner: User) -> Path:
    path = parent / name
    path.mkdir(mode=0o755)
    os.chown(path, owner.uid, owner.gid)
    return path


@contextlib.contextmanager
def flipping(user: User, a: Path, b: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`user` swaps the names `a` and `b` (renameat2 RENAME_EXCHANGE) in a loop, from
    outside every root process, until the block ends; then `a` is the original `a` again."""
    before = os.lstat(a).st_ino
    proc = subprocess.Popen(["runuser", "-u", user.name, "--", *flipper_argv(str(a), str(b))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        assert proc.poll() is None, "flipper died"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["pkill", "-KILL", "-u", user.name, "-f", "renameat2"], check=False)
        time.sleep(0.1)
        if os.lstat(a).st_ino != before:
            from tests.security.h4_support import exchange

            exchange(str(a), str(b))
        assert os.lstat(a).st_ino == before


def submit(cluster: Cluster, user: User, image: Path, outdir: Path, command: str = "true",
           extra: tuple[str, ...] = ()) -> int | None:
    """sbatch as `user`; None when sbatch itself refuses (e.g. the name is a symlink now)."""
    done = cluster.as_user(user, "sbatch", "--parsable", f"--time={JOB_LIMIT_MIN}", f"--oci-sif-overlay={image}",
                           "-o", f"{outdir}/%j.out", "-D", "/", *extra, "--wrap", command)
    if done.returncode != 0:
        return None
    return int(done.stdout.strip().split(";")[0])


def wait_all(cluster: Cluster, jobs: list[int], *, per_job: float = JOB_LIMIT_MIN * 60 + 60) -> dict[int, str]:
    """Every job ends (and its Epilog finishes) within its time limit plus a margin: no
    root process of ours blocked."""
    return {job: cluster.wait_finished(job, timeout=per_job) for job in jobs}


def assert_node_not_drained(cluster: Cluster) -> None:
    state = cluster.node_state()
    assert "drain" not in state and "down" not in state, f"node {cluster.host} is {state}"


def sweep(cluster: Cluster, *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real sweeper pass (`sifoverlay recover --slurm`, as the systemd timer runs it)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
    conf = os.environ.get("SLURM_CONF")
    if conf:
        env["SLURM_CONF"] = conf
    return sh(PKG_PYTHON, "-m", "sifoverlay", "recover", "--slurm", "--json", check=False, timeout=timeout, env=env)


def victim_rw_job_runs(cluster: Cluster, victim: User, image: Path, outdir: Path) -> None:
    """The victim's next rw job on its image runs and writes into the overlay."""
    job = submit(cluster, victim, image, outdir, command="echo victim-was-here > /victim.txt")
    assert job is not None, "victim's sbatch refused"
    state = cluster.wait_finished(job, timeout=JOB_LIMIT_MIN * 60 + 60)
    out = Path(outdir / f"{job}.out")
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", f"victim's job {job} is {state}: {text}"


def set_ext3_dirty(fd: int, overlay_offset: int) -> None:
    """Clear the superblock's 'cleanly unmounted' state bit through `fd` (the image owner
    can do this to her own image): the next rw Prolog reconciles the dirty overlay first."""
    state_at = overlay_offset + 1024 + 58
    raw = bytearray(os.pread(fd, 2, state_at))
    raw[0] &= ~0x01
    os.pwrite(fd, bytes(raw), state_at)  # io-seam: exempt (test: the attacker's own write)
    os.fsync(fd)


def overlay_offset(image: Path) -> int:
    from sifoverlay.ocisif import open_image

    with open_image(str(image)) as img:
        assert img.overlay is not None
        return img.overlay.offset


def chown_copy(src: Path, dst: Path, owner: User, mode: int = 0o644) -> Path:
    shutil.copyfile(src, dst)
    os.chown(dst, owner.uid, owner.gid)
    os.chmod(dst, mode)
    return dst


def outdir_for(parent: Path) -> Path:
    out = parent / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    return out


def job_done_states() -> set[str]:
    return set(JOB_DONE_STATES)
