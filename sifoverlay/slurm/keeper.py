"""The per-job lease keeper: heartbeat while the job runs, fence when the lease is lost.

The Prolog takes the job's lease (TTL of minutes: plugstack ``lease_ttl=``, ``lease_grace=``)
and starts one keeper per (job, node) with `start`: a detached process (own session, no
inherited fds) that outlives the Prolog, renews the lease every ttl/3 seconds and is
recorded in the lease as its holder (host, boot_id, pid, start time), so a node that
dies, reboots or freezes stops renewing and its lease becomes breakable by the rule of
engine/leasestale.py, while a live job's lease never expires.

It exits, releasing nothing, when the job's session is closed or on SIGTERM: the job end
(`jobend.finish_job`) stops it with `stop` right before releasing the lease itself.

When the lease is lost (engine/leasekeeper.py: record gone or retaken, or expired past the
grace while this node was frozen or cut off) it renews nothing and fences this node's
use of the image: SIGKILL (no flush, no unmount) of the job's FUSE daemons (from the
runtime's per-job state) and of every other process ON THIS NODE that has the image open
for writing, except root's own hooks and other jobs' processes (`spared`: the next job's
Prolog waiting for the image must not be killed). "On this node" is decided by namespace
identity, never by pid alone: on the multi-node test bed every node shares one pid space
(docs/slurm.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Final

__all__ = ["fence", "main", "node_processes_writing", "spared", "start", "stop", "wait_ready"]

log = logging.getLogger(__name__)

STOP_TIMEOUT: Final = 5.0


def start(*, job_id: str, key: str, token: str, image: str, dev: int, ino: int, state_dir: str,
          journal_dir: str, mounts_dir: str, ttl: float, grace: float, host: str,
          wait: bool = True) -> subprocess.Popen[bytes]:
    """Start the keeper detached (returned once it has renewed the lease as its holder;
    `wait=False`: at once, call `wait_ready` later - the Prolog mounts meanwhile).
    The Prolog exits without waiting for it; slurmd does not wait for it either (own
    session, no inherited output pipes)."""
    argv = [sys.executable, "-m", "sifoverlay.slurm.keeper", "--job", job_id, "--key", key, "--token", token,
            "--image", image, "--dev", str(dev), "--ino", str(ino), "--state-dir", state_dir,
            "--journal-dir", journal_dir, "--mounts-dir", mounts_dir, "--ttl", repr(float(ttl)),
            "--grace", repr(float(grace)), "--host", host]
    env = {k: v for k, v in os.environ.items() if k.startswith(("SIFOVERLAY_", "PYTHON", "SLURM_"))}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd="/", start_new_session=True, close_fds=True, env=env)
    if wait:
        wait_ready(proc, job_id=job_id, key=key, token=token, state_dir=state_dir)
    return proc


def wait_ready(proc: subprocess.Popen[bytes], *, job_id: str, key: str, token: str, state_dir: str,
               timeout: float = 10.0) -> None:
    """Until the keeper `proc` has renewed the lease as its holder (RuntimeError if it died)."""
    ready = time.monotonic() + timeout
    from sifoverlay.engine import lease

    while time.monotonic() < ready and proc.poll() is None:  # wait for its first renewal
        info = lease.inspect(key=key, state_dir=state_dir)
        held = [info, *lease.readers(key=key, state_dir=state_dir)]
        mine = next((h for h in held if h is not None and h.token == token), None)
        if mine is None or (mine.pid == proc.pid and mine.record.get("keeper")):
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        raise RuntimeError(f"the lease keeper of job {job_id} exited at once (status {proc.returncode})")


def stop(info: object) -> bool:
    """SIGTERM the keeper recorded in the lease record `info` (a LeaseInfo) and wait for
    it, only if it runs HERE (same host and boot) and is still that process. True when a
    keeper was stopped."""
    from sifoverlay.engine import lease, procs

    if info is None or not isinstance(info, lease.LeaseInfo) or not info.record.get("keeper"):
        return False
    if not lease.held_here(info) or info.pid == os.getpid() or not procs.process_alive(info.pid, info.started):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while procs.process_alive(info.pid, info.started) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.pid, os.WNOHANG)
        time.sleep(0.02)
    if procs.process_alive(info.pid, info.started):
        log.warning("lease keeper pid %d did not stop: killing it", info.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
    return True


# --- fencing ------------------------------------------------------------------------------------
def _ns(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def on_this_node(pid: int) -> bool:
    """`pid` runs on this node: it shares our UTS or network namespace (on a real cluster
    every local process does; on a test bed with one pid space, only this node's do)."""
    return any(_ns(pid, kind) is not None and _ns(pid, kind) == _ns("self", kind) for kind in ("uts", "net"))


def spared(pid: int | str, job_id: str | None) -> bool:
    """Not one of the job's writers, although it may have the image open for writing:
    root's own hooks (Prolog, Epilog, reconcile worker, sweeper: each works under a lease
    it checks itself), anything in a Prolog/Epilog context (SLURM_SCRIPT_CONTEXT), and
    processes of another job (SLURM_JOB_ID). Killing the next job's Prolog, which holds
    the image open while it waits for the lease, fails it and drains the node."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:  # no-path-open: ok (procfs)
            uids = next((line.split()[1:] for line in fh if line.startswith("Uid:")), [])
        with open(f"/proc/{pid}/environ", "rb") as fh:  # no-path-open: ok (procfs)
            environ = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    except OSError:
        return False  # unreadable: judged by its open file alone
    if uids[:1] == ["0"] or b"SLURM_SCRIPT_CONTEXT" in environ:
        return True
    other = environ.get(b"SLURM_JOB_ID")
    return job_id is not None and other is not None and other.decode(errors="replace") != str(job_id)


def node_processes_writing(image: str, ino: int, job_id: str | None = None) -> list[int]:
    """Pids on this node with `image` (inode `ino`) open for writing, except those `spared`
    for job `job_id`. Read from /proc without touching any file through the fd (readlink
    and fdinfo only: a stat through the fd could hang on a frozen FUSE daemon)."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me or not on_this_node(int(name)):
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
                with open(f"/proc/{name}/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:  # no-path-open: ok (procfs)
                    info = dict(line.split(":", 1) for line in fh if ":" in line)
            except OSError:
                continue
            if target.removesuffix(" (deleted)") != image:
                continue
            if "ino" in info and info["ino"].strip() != str(ino):
                continue
            if int(info.get("flags", "0").strip(), 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                if not spared(name, job_id):
                    found.append(int(name))
                break
    return found


def fence(job_id: str, image: str, ino: int, mounts_dir: str) -> list[int]:
    """SIGKILL this node's writers of the image: the job's FUSE daemons first (from the
    runtime record; pid + start time checked), then any process of this node with the
    image open for writing that is not `spared` (root's hooks, other jobs). No unmount,
    no flush: whatever they had not written is dropped. Returns the pids killed."""
    from sifoverlay.engine import procs
    from sifoverlay.runtime import state

    killed = []
    try:
        recorded = state.load(mounts_dir, job_id)
    except Exception as exc:  # noqa: BLE001 - a damaged record must not stop the fence
        log.error("job %s: runtime record unreadable (%s): fencing by /proc only", job_id, exc)
        recorded = None
    for step in recorded.steps if recorded is not None else ():
        if step.kind == "fuse" and step.pid and procs.process_alive(step.pid, step.pid_start) and on_this_node(step.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(step.pid, signal.SIGKILL)
                killed.append(step.pid)
    for pid in node_processes_writing(image, ino, job_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    log.error("job %s: fenced %s: killed %s", job_id, image, killed or "nothing (no writer left)")
    return killed


def main(argv: list[str] | None = None) -> int:
    from sifoverlay.engine import leasekeeper, sessions
    from sifoverlay.engine.leasefile import LEASE_SUFFIX

    from . import logsetup

    parser = argparse.ArgumentParser(prog="sifoverlay-lease-keeper")
    for name in ("job", "key", "token", "image", "state-dir", "journal-dir", "mounts-dir", "host"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("dev", "ino"):
        parser.add_argument(f"--{name}", required=True, type=int)
    for name in ("ttl", "grace"):
        parser.add_argument(f"--{name}", required=True, type=float)
    args = parser.parse_args(argv)
    logsetup.setup("keeper", job=args.job, image=args.image)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    leases = os.path.join(args.state_dir, "leases")
    writer = os.path.join(leases, f"{args.key}{LEASE_SUFFIX}")
    reader = f"{writer}.r.{args.token}"
    lease_file = reader if os.path.lexists(reader) else writer
    timing = leasekeeper.KeeperTiming(ttl=args.ttl, grace=args.grace)

    def ended() -> bool:
        try:
            return sessions.load(args.journal_dir, args.job, host=args.host) is None
        except Exception:  # noqa: BLE001 - an unreadable session is not an end
            return False

    def fence_and_mark(reason: str) -> None:
        fence(args.job, args.image, args.ino, args.mounts_dir)
        # Written down in the job's session (after the kill: that is what is urgent), so the
        # job end and the cluster sweeper can tell a fenced job from one that ended.
        try:
            sessions.amend(args.journal_dir, args.job, {"fenced": reason, "fenced_at": time.time()},
                           host=args.host)
        except Exception:  # noqa: BLE001 - the fence is done; the mark is a note
            log.exception("job %s: cannot mark its session fenced", args.job)

    verdict = leasekeeper.keep(lease_file, args.token, timing, stop=stopped, ended=ended, fence=fence_and_mark)
    log.info("job %s: lease keeper done: %s", args.job, verdict)
    return 0 if verdict == "ended" else 3


if __name__ == "__main__":
    sys.exit(main())
