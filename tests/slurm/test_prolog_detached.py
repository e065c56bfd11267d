"""prolog_mounts=detached (the default; issue 17 item 1): the Prolog forks its mounter,
exits once the job holds its lease, and the mounter finishes the rootfs while slurmd
starts the job; the job's record says ``preparing`` with the mounter's pid and start time
meanwhile, and a job end waits for a live mounter. No cluster: the live path is in
test_prolog_detached_live.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sifoverlay.engine.procs import process_alive, process_start_ticks
from sifoverlay.slurm import prolog, records
from sifoverlay.slurm.config import SlurmConfig

REPO = Path(__file__).resolve().parents[2]


def _records_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "slurm")


def test_a_preparing_record_names_its_mounter(tmp_path: Path) -> None:
    path = records.write_preparing(_records_dir(tmp_path), "41", "/img/a.oci.sif", "rw",
                                   requested="/link/a.oci.sif", preparer=(1234, 98765))
    assert Path(path).read_text() == ("status=preparing\nimage=/img/a.oci.sif\nrequested=/link/a.oci.sif\n"
                                      "mode=rw\npreparer=1234:98765\n")
    record = records.read(_records_dir(tmp_path), "41")
    assert record is not None
    assert (record.status, record.mode, record.preparer_process()) == ("preparing", "rw", (1234, 98765))
    records.write_ready(_records_dir(tmp_path), "41", "/img/a.oci.sif", "rw", "/run/m/41/rootfs")
    ready = records.read(_records_dir(tmp_path), "41")
    assert ready is not None and (ready.status, ready.preparer, ready.preparer_process()) == ("ready", "", None)


@pytest.mark.parametrize("value", ["", "12", "12:", ":5", "x:5", "12:5x"])
def test_a_malformed_preparer_names_no_process(value: str) -> None:
    assert records.JobRecord("1", "preparing", "/i", preparer=value).preparer_process() is None


def _preparing_for(tmp_path: Path, job: str, proc: subprocess.Popen[bytes], *, started: int | None = None) -> None:
    ticks = process_start_ticks(proc.pid) if started is None else started
    assert ticks is not None
    records.write_preparing(_records_dir(tmp_path), job, "/img/a.oci.sif", "ro", preparer=(proc.pid, ticks))


def test_a_job_end_waits_for_a_live_mounter(tmp_path: Path) -> None:
    mounter = subprocess.Popen(["sleep", "0.6"])
    try:
        _preparing_for(tmp_path, "42", mounter)
        began = time.monotonic()
        record = records.wait_for_preparer(_records_dir(tmp_path), "42", timeout=30)
        waited = time.monotonic() - began
    finally:
        mounter.wait()
    assert 0.4 <= waited < 5, waited
    assert record is not None and record.status == "preparing"  # it died without a word: the caller goes on


def test_a_job_end_does_not_wait_for_a_recycled_pid(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        started = process_start_ticks(other.pid)
        assert started is not None
        _preparing_for(tmp_path, "43", other, started=started + 1)  # the pid, but not the process
        began = time.monotonic()
        records.wait_for_preparer(_records_dir(tmp_path), "43", timeout=30)
        assert time.monotonic() - began < 0.5
        assert other.poll() is None  # and it is never signalled
    finally:
        other.kill()
        other.wait()


def test_a_mounter_past_the_bound_is_killed(tmp_path: Path) -> None:
    stuck = subprocess.Popen(["sleep", "60"])
    try:
        _preparing_for(tmp_path, "44", stuck)
        began = time.monotonic()
        records.wait_for_preparer(_records_dir(tmp_path), "44", timeout=0.3)
        assert time.monotonic() - began < 3
        assert stuck.wait(timeout=5) == -signal.SIGKILL
    finally:
        stuck.kill()
        stuck.wait()


def test_no_wait_without_a_preparing_record(tmp_path: Path) -> None:
    assert records.wait_for_preparer(_records_dir(tmp_path), "45") is None
    records.write_refused(_records_dir(tmp_path), "45", "/img/a.oci.sif", "refused: busy")
    record = records.wait_for_preparer(_records_dir(tmp_path), "45")
    assert record is not None and record.status == "refused"


# -- the fork: a Prolog process around a stand-in for run() ------------------------------------
# The Prolog process is a child of the test (python -c), so that the test can kill it; its
# run() is replaced by a stand-in that writes what it sees into files and, unless told not
# to, releases the Prolog and goes on (the mounts).
_PROLOG = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from sifoverlay.slurm import prolog
    from sifoverlay.slurm.config import SlurmConfig
    from sifoverlay.slurm.jobenv import JobEnv

    out = Path(sys.argv[1])
    mode = sys.argv[2]

    def stand_in(env=None, *, config=None, release=None):
        (out / "mounter").write_text(f"{os.getpid()} {os.getsid(0)} {os.readlink('/proc/self/fd/1')}")
        if mode == "refuse":
            return "refused"
        if mode == "die":
            os._exit(0)  # before any word: no record
        if mode == "release":
            release()
            time.sleep(0.5)  # the mounts, after the Prolog has gone
        else:  # "hang": never releases
            time.sleep(60)
        (out / "mounted").write_text("yes")
        return "ready"

    prolog.run = stand_in
    config = SlurmConfig()
    job = prolog._job_with_image(config) or JobEnv("0", os.getuid(), os.getgid(), None, None, None, None)
    print("released" if prolog.run_detached(config, job) == "released" else "ended", flush=True)
    (out / "prolog-exit").write_text(str(time.monotonic()))
""")


def _prolog(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _PROLOG, str(tmp_path), mode], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _wait_for(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    time.sleep(0.05)  # written by write_text: let it finish
    return path.read_text()


def test_the_prolog_exits_at_the_release_and_the_mounter_goes_on(tmp_path: Path) -> None:
    proc = _prolog(tmp_path, "release")
    out, _ = proc.communicate(timeout=30)  # slurmd reads the Prolog's output to its end: no wait for the mounter
    assert (proc.returncode, out) == (0, "released\n")
    assert not (tmp_path / "mounted").exists()  # the Prolog did not wait for the mounts
    pid, sid, stdout = _wait_for(tmp_path / "mounter").split()
    assert int(sid) == int(pid) and int(sid) != proc.pid  # its own session (the Prolog led one): slurmd's killpg misses it
    assert stdout == "/dev/null"  # not slurmd's pipe
    assert _wait_for(tmp_path / "mounted") == "yes"


def test_a_refusal_before_the_release_ends_the_prolog_with_the_mounter(tmp_path: Path) -> None:
    proc = _prolog(tmp_path, "refuse")
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, "ended\n")
    pid = int(_wait_for(tmp_path / "mounter").split()[0])
    assert not process_alive(pid, None)  # reaped by the Prolog


def test_a_mounter_that_dies_before_any_word_leaves_a_refusal(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "48", "SLURM_JOB_UID": str(os.getuid()),
           "SLURM_JOB_GID": str(os.getgid()), "SPANK_OCI_SIF_OVERLAY": "/img/a.oci.sif:ro",
           "SIFOVERLAY_TEST_RUNTIME": str(tmp_path / "run")}
    script = _PROLOG.replace("SlurmConfig()", "SlurmConfig(runtime_dir=os.environ['SIFOVERLAY_TEST_RUNTIME'])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), "die"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert (done.returncode, done.stdout) == (0, "ended\n"), done.stderr
    record = records.read(str(tmp_path / "run" / "slurm"), "48")
    assert record is not None and record.status == "refused"
    assert record.message == ("refused: /img/a.oci.sif: the sifoverlay Prolog's mounter died before it could "
                              "prepare the job (the node's sifoverlay log says why)")


def test_a_killed_prolog_takes_its_unreleased_mounter_with_it(tmp_path: Path) -> None:
    """slurmd kills a Prolog past PrologEpilogTimeout: an inline Prolog's mounts die with
    it, and so does a mounter that has not been released (PR_SET_PDEATHSIG)."""
    proc = _prolog(tmp_path, "hang")
    try:
        pid = int(_wait_for(tmp_path / "mounter").split()[0])
        started = process_start_ticks(pid)
        assert process_alive(pid, started)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while process_alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not process_alive(pid, started)
    finally:
        proc.kill()
        proc.wait()


def test_a_released_mounter_outlives_its_prolog(tmp_path: Path) -> None:
    proc = _prolog(tmp_path, "release")
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    # the Prolog has exited (reaped above) and the mounter still finishes
    assert _wait_for(tmp_path / "mounted") == "yes"


def test_main_runs_inline_when_the_admin_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from sifoverlay.slurm import logsetup

    calls: list[str] = []
    monkeypatch.setattr(logsetup, "setup", lambda *args, **kwargs: None)  # keep pytest's handlers
    monkeypatch.setattr(prolog, "load_config", lambda: SlurmConfig(prolog_mounts="inline"))
    monkeypatch.setattr(prolog, "run", lambda env=None, *, config=None, release=None: calls.append(
        f"run release={release}") or "ready")
    monkeypatch.setattr(prolog, "run_detached", lambda config, job: calls.append(f"detached {job.job_id}") or "released")
    monkeypatch.setenv("SPANK_OCI_SIF_OVERLAY", "/img/a.oci.sif:ro")
    monkeypatch.setenv("SLURM_JOB_ID", "46")
    monkeypatch.setenv("SLURM_JOB_UID", str(os.getuid()))
    monkeypatch.setenv("SLURM_JOB_GID", str(os.getgid()))
    assert prolog.main([]) == 0
    monkeypatch.setattr(prolog, "load_config", lambda: SlurmConfig(prolog_mounts="detached"))
    assert prolog.main([]) == 0
    monkeypatch.delenv("SPANK_OCI_SIF_OVERLAY")
    assert prolog.main([]) == 0  # no image: nothing to fork for
    assert calls == ["run release=None", "detached 46", "run release=None"]
