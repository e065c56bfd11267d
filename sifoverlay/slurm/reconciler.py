"""The reconcile worker of a rw job's end (plugstack epilog_reconcile=async, the default).

The Epilog unmounts the job's rootfs, checks the image is still the authorized inode,
marks the job's session "reconcile pending" (with the ext3 superblock fingerprint it saw)
and starts this worker, handing it the job-end lock (slurm/endlock.py) by fd. Then the
Epilog returns and slurmd frees the node while the worker, still inside the job's lease
(the job's keeper keeps heartbeating it as long as the session is open), hashes the
overlay and commits the new digest (jobend.finish_job's steps 2-5, with no hash
deadline: it holds no node), releases the lease and closes the session.

A next rw job on the image finds the lease held by an ended job whose end is in progress
and waits in its Prolog until the commit is done (prolog._wait_for_ending_holders). A
worker that dies (node crash, OOM, kill) drops the job-end lock with its fd; the session
stays "reconcile pending" and the sweeper ends the job as it ends any job whose Epilog
failed: recover the journal, reconcile, release.

Started detached (new session, stdin/stdout/stderr on /dev/null) so that slurmd, which
waits for the Epilog and its output, does not wait for it. docs/slurm.md "Job end".
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SlurmConfig

__all__ = ["main", "spawn"]

log = logging.getLogger(__name__)


def spawn(job_id: str, host: str, lock_fd: int, config: SlurmConfig, env: dict[str, str] | None = None) -> int:
    """Start the worker for `job_id` on `host`, handing it `lock_fd` and the Epilog's own
    configuration (so both act on the same directories); returns its pid."""
    import dataclasses
    import json

    argv = [sys.executable, "-m", "sifoverlay.slurm.reconciler", "--job", job_id, "--host", host,
            "--lock-fd", str(lock_fd), "--config", json.dumps(dataclasses.asdict(config))]
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(lock_fd,), start_new_session=True, env=child_env, cwd="/")
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    from sifoverlay.errors import SifOverlayError
    from sifoverlay.fsio import io_from_env

    from . import logsetup
    from .config import load_config
    from .endlock import JobEndLock, lock_path
    from .jobend import finish_pending

    parser = argparse.ArgumentParser(prog="sifoverlay-reconcile-worker")
    parser.add_argument("--job", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--lock-fd", required=True, type=int)
    parser.add_argument("--config", help="the Epilog's SlurmConfig as JSON (default: plugstack.conf)")
    args = parser.parse_args(argv)
    logsetup.setup("reconciler", job=args.job)
    try:
        config = _config(args.config) if args.config else load_config(env=dict(os.environ))
    except (SifOverlayError, ValueError, TypeError) as exc:
        log.error("sifoverlay is misconfigured on this node: %s (job %s left for the sweeper)", exc, args.job)
        return 2
    try:
        lock = JobEndLock.adopt(lock_path(config.journal_dir, args.job, args.host), args.lock_fd)
    except OSError as exc:
        log.error("job %s: %s: left for the sweeper", args.job, exc)
        return 2
    try:
        outcome = finish_pending(args.job, config, lock, host=args.host, io=io_from_env())  # the tests' crash hook
    except BaseException:  # the sweeper takes over; never a traceback on a closed stderr only
        log.exception("job %s: reconcile worker crashed (left for the sweeper)", args.job)
        return 1
    finally:
        lock.release()
    from .epilog import write_metrics

    write_metrics(outcome, config)
    return 0 if outcome.ok else 1


def _config(text: str) -> SlurmConfig:
    import json

    from .config import SlurmConfig

    fields = json.loads(text)
    fields["image_roots"] = tuple(fields.get("image_roots", ()))
    return SlurmConfig(**fields)


if __name__ == "__main__":
    sys.exit(main())
