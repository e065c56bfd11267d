"""The async job end (plugstack epilog_reconcile=async, the default; issue 17 item 2),
without the Slurm cluster: the real Epilog process hands the hash to the real reconcile
worker and returns; the job-end lock keeps every other ender (sweeper, a next Prolog) out
while the worker runs, and a dead worker's job is ended by the sweeper.

Real images (busybox OCI-SIF + sparse 64 MiB ext3 overlay), real writes through debugfs,
real leases. The live cluster tests (tests/slurm, tests/cluster) run in async mode too.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sifoverlay.slurm import endlock
from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.jobend import finish_job
from sifoverlay.slurm.phases import records_of_job

from tests.conftest import REPO
from tests.slurm.test_epilog_metrics import (  # noqa: F401 - fixtures
    _lease_by_exited_process, _start_session, _write_with_debugfs, config, overlay_image, textdir,
)

pytest.importorskip("prometheus_client")


def _wait_for_worker(config: SlurmConfig, job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while endlock.in_progress(config.journal_dir, job):
        assert time.monotonic() < deadline, f"job {job}: the reconcile worker is still running"
        time.sleep(0.05)


def test_epilog_hands_the_hash_to_a_worker_that_reconciles_and_releases(
    overlay_image: Path, config: SlurmConfig, textdir: Path, tmp_path: Path,
) -> None:
    from sifoverlay.engine import lease, sessions, status

    _lease_by_exited_process(overlay_image, "46", ttl=365 * 24 * 3600.0)
    _start_session(config, "46", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path)
    assert status(overlay_image).state != "clean"
    plugstack = tmp_path / "plugstack.conf"
    plugstack.write_text(f"required /usr/lib/sifoverlay/sifoverlay_spank.so journal_dir={config.journal_dir} "
                         f"runtime_dir={config.runtime_dir} state_dir={config.state_dir} epilog_reconcile=async\n")
    log = tmp_path / "slurm.log"
    env = {**os.environ, "SLURM_JOB_ID": "46", "SIFOVERLAY_PLUGSTACK": str(plugstack),
           "SIFOVERLAY_TEXTFILE_DIR": str(textdir), "SIFOVERLAY_SLURM_LOG": str(log)}
    done = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "sifoverlay.slurm.epilog"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pending at step handoff" in done.stderr, done.stderr
    _wait_for_worker(config, "46")
    assert sessions.load(config.journal_dir, "46") is None
    assert status(overlay_image).state == "clean"
    assert lease.inspect(overlay_image, state_dir=config.state_dir) is None  # the worker released the lease
    records = records_of_job(tmp_path / "timing.jsonl", "46")
    assert set(records) == {"epilog", "worker"}, records
    epilog, worker = records["epilog"], records["worker"]
    assert (epilog["result"], epilog["mode"]) == ("pending", "rw")
    assert set(epilog["phases"]) == {"unmount", "verify", "handoff"}, epilog  # type: ignore[arg-type]
    assert worker["result"] == "reconciled"
    assert {"unmount", "verify", "quiesce", "lock", "replay", "hash", "commit", "release", "session",
            "record"} <= set(worker["phases"]), worker  # type: ignore[arg-type]
    assert "sync" not in worker["phases"] or worker["phases"]["sync"] < 0.5  # type: ignore[index,operator]
    text = log.read_text()
    assert "op=reconciler" in text and "job 46 (worker): reconciled at step record" in text, text[-2000:]


def test_while_a_process_ends_the_job_every_other_ender_stays_out(
    overlay_image: Path, config: SlurmConfig, tmp_path: Path,
) -> None:
    """The worker's job-end lock: the sweeper (or a next Prolog) gets 'busy' and touches
    nothing; once the holder is gone without finishing (a crashed worker), the sweeper's
    finish_job ends the job: reconciled, session closed."""
    from sifoverlay.engine import sessions, status

    _lease_by_exited_process(overlay_image, "47", ttl=365 * 24 * 3600.0)
    _start_session(config, "47", overlay_image)
    _write_with_debugfs(overlay_image, tmp_path)
    sessions.amend(config.journal_dir, "47", {"pending": "reconcile"}, host=os.uname().nodename)
    before = overlay_image.read_bytes()
    holder = subprocess.Popen(  # a worker that holds the lock and then dies without finishing
        [str(REPO / ".venv/bin/python"), "-c",
         "import sys, time\nfrom sifoverlay.slurm import endlock\n"
         "held = endlock.take(sys.argv[1], '47', sys.argv[2])\nprint('held' if held else 'busy', flush=True)\n"
         "time.sleep(600)\n", config.journal_dir, os.uname().nodename],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert endlock.in_progress(config.journal_dir, "47")
        busy = finish_job("47", replace(config, epilog_reconcile="sync"), reason="sweeper")
        assert (busy.result, busy.step, busy.ok) == ("busy", "lock", True), busy
        assert overlay_image.read_bytes() == before
        assert sessions.load(config.journal_dir, "47").details["pending"] == "reconcile"  # type: ignore[union-attr]
    finally:
        holder.kill()
        holder.wait()
    assert not endlock.in_progress(config.journal_dir, "47")  # the lock died with its holder
    done = finish_job("47", config, reason="sweeper")
    assert (done.result, done.step) == ("reconciled", "record"), done
    assert sessions.load(config.journal_dir, "47") is None
    assert status(overlay_image).state == "clean"


def test_job_end_lock_file_is_reused_safely_after_unlink(tmp_path: Path) -> None:
    journal = str(tmp_path / "journal")
    first = endlock.take(journal, "9", "n1")
    assert first is not None and endlock.take(journal, "9", "n1") is None
    other = endlock.take(journal, "9", "n2")  # per host
    assert other is not None
    other.release()
    path = first.path
    first.release()
    assert not os.path.exists(path)  # the holder removes it: no file per job left behind
    again = endlock.take(journal, "9", "n1")
    assert again is not None and endlock.in_progress(journal, "9")
    again.hand_over()  # a worker has it now: this process neither unlinks nor keeps it locked
    again_fd_copy = os.dup(again.fd)
    again.release()
    assert os.path.exists(path) and endlock.in_progress(journal, "9")
    os.close(again_fd_copy)  # the worker's last fd
    assert not endlock.in_progress(journal, "9")


def test_a_job_end_breaks_its_lease_records_of_an_earlier_boot_of_this_node(
    overlay_image: Path, config: SlurmConfig,
) -> None:
    """A node killed while its job ended (reconcile worker and keeper gone) and booted
    again: the next Prolog there finishes the job (reason prolog). Its lease records, from
    the earlier boot, are dead; closing the session without breaking them left them for
    nobody (the 3-node soak: image 'in-use' at the end, the next writer refused)."""
    import json
    import socket

    from sifoverlay.engine import lease, sessions

    _lease_by_exited_process(overlay_image, "47", ttl=600.0)
    info = lease.inspect(overlay_image, state_dir=config.state_dir)
    assert info is not None
    Path(info.path).write_text(json.dumps(dict(info.record, boot_id="an-earlier-boot")))
    _start_session(config, "47", overlay_image, mode="ro")
    assert socket.gethostname() == info.host
    ended = finish_job("47", config, reason="prolog")
    assert ended.ok and ended.result == "released", ended
    assert lease.inspect(overlay_image, state_dir=config.state_dir) is None
    assert sessions.load(config.journal_dir, "47") is None
