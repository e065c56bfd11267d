"""A node frozen mid-write past its lease's expiry + grace, on the 3-node test bed (issue 13):
`dev-cluster node freeze n2` SIGSTOPs every process of n2 (its slurmd, the job, the job's
lease keeper and its ext3 FUSE daemon), `thaw` SIGCONTs them.

The bed's nodes share one kernel, so the frozen fuse2fs keeps its OFD write lock on the
image's ext3 region, exactly as a cluster filesystem with cluster-wide locks keeps a hung
client's lock until it evicts that client. The rule (docs/slurm.md, failure table):

* while n2 is frozen nobody else mounts or writes the image: the cluster sweeper on n1
  reports it, in one line and without waiting on the lock, as held by a frozen or
  unreachable holder and leaves lease and session alone;
* on thaw, n2's keeper finds its lease expired past the grace and fences: its FUSE daemon
  is SIGKILLed (no flush) and the lock goes;
* the next sweep reconciles the image exactly once; the frozen job never ends COMPLETED,
  and its end is recorded as fenced, its lost writes never silently kept as a success.

The measured times are printed (run with -s).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sifoverlay.engine import leaselock, sessions
from sifoverlay.slurm.config import SlurmConfig

from tests.cluster.conftest import Bed, overlay_status
from tests.cluster.test_failures import (  # noqa: F401  (conf: module fixture)
    SLURMD_TIMEOUT,
    assert_consistent,
    assert_prefix,
    conf,
    holder,
    overlay_file,
    revisions_of,
    session_open,
    start_writer,
    sweep_on,
    wait_for,
)
from tests.slurm.conftest import User

FROZEN_LINE = "frozen or unreachable holder"


def write_locked(image: Path) -> bool:
    """Somebody holds a write lock on the image's ext3 region (probed, never waited for)."""
    from sifoverlay.ocisif import open_image

    with open_image(image) as img:
        assert img.overlay is not None
        region = (img.overlay.offset, img.overlay.size)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        found = leaselock.probe(fd, *region, ltype=fcntl.F_WRLCK)
    finally:
        os.close(fd)
    return found is not None and found[0] == fcntl.F_WRLCK


def image_digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def mentions(report: dict[str, object], job: int) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    outcomes = [o for o in report.get("outcomes", []) if str(o.get("job_id")) == str(job)]  # type: ignore[union-attr]
    skipped = [s for s in report.get("skipped", []) if str(s.get("job_id")) == str(job)]  # type: ignore[union-attr]
    return outcomes, skipped


@pytest.mark.parametrize("after_thaw", ["sweeper", "own-epilog"])
def test_node_frozen_past_expiry_is_fenced_on_thaw_and_reconciled_once(
        bed: Bed, bed_users: tuple[User, User], bed_image: Callable[..., Path], bed_out: Path,
        conf: SlurmConfig, after_thaw: str) -> None:
    """after_thaw: who may end the frozen job: the cluster sweeper on n1, run once a second
    from the thaw on, racing n2's own job end (either may win, exactly one does), or n2's
    own Epilog alone (no sweep: a sweeper timer runs every few minutes)."""
    alice = bed_users[0]
    image = bed_image(alice)
    job = start_writer(bed, alice, image, "n2", conf)
    token = holder(conf, image).token  # type: ignore[union-attr]
    assert write_locked(image)
    assert bed.dev("node", "freeze", "n2").returncode == 0
    frozen = time.monotonic()
    before = image_digest(image)
    # A second writer on n1 meanwhile: it must neither mount nor write while n2 is frozen.
    second = bed.sbatch(alice, "-w", "n1", f"--oci-sif-overlay={image}", "-o", str(bed_out / "second.out"),
                        "-D", "/", "--wrap", 'echo "$SLURM_JOB_ID second" >> /second.log')

    # -- frozen: sweeps on n1 until Slurm has n2 DOWN and the lease is stale, and beyond ------
    stale_after = conf.lease_ttl + conf.lease_grace
    attempt_at: float | None = None
    lines: list[str] = []
    sweeps, longest = 0, 0.0
    deadline = frozen + SLURMD_TIMEOUT + 30 + stale_after
    while time.monotonic() < deadline:
        began = time.monotonic()
        report = sweep_on(bed, "n1")
        longest = max(longest, time.monotonic() - began)
        sweeps += 1
        outcomes, skipped = mentions(report, job)
        assert outcomes == [], f"n1 touched the frozen node's job: {report}"
        lines += [str(s["why"]) for s in skipped]
        if attempt_at is None and any(FROZEN_LINE in str(s["why"]) for s in skipped):
            attempt_at = time.monotonic() - frozen
        if attempt_at is not None and time.monotonic() - frozen > attempt_at + 5:
            break  # a few more sweeps say the same and leave it alone
        time.sleep(1.0)
    assert attempt_at is not None, f"no sweep reported the frozen holder; said: {lines[-3:]}"
    assert "down" in bed.node_state("n2")
    assert longest < 60, f"a sweep took {longest:.1f}s: it must never wait on the frozen holder's lock"
    frozen_lines = [line for line in lines if FROZEN_LINE in line]
    print(f"\nfreeze: sweep line: {frozen_lines[0]}")
    assert frozen_lines[0].startswith(f"image {image} held by a frozen or unreachable holder: host n2's lease is "
                                      "stale"), frozen_lines[0]
    assert "fuse2fs pid" in frozen_lines[0] and frozen_lines[0].endswith("; not taken over"), frozen_lines[0]
    # Nobody else mounted or wrote it: lease, session and bytes are as the frozen node left them.
    assert image_digest(image) == before
    info = holder(conf, image)
    assert info is not None and info.token == token and info.host == "n2"
    assert session_open(conf, job, "n2") and revisions_of(image, job) == []
    for node in ("n1", "n3"):
        assert image.parent.name not in bed.mounts(node), f"{node} mounted the frozen node's image"
    assert write_locked(image)
    second_frozen = bed.job_state(second)

    # -- thaw: n2's keeper fences, the lock goes, the next sweep reconciles once ------------
    assert bed.dev("node", "thaw", "n2").returncode == 0
    thawed = time.monotonic()
    fence_took = wait_for(lambda: not write_locked(image), 60, "n2's keeper to fence (lock gone)", every=0.05)
    marks: list[object] = []

    def marked() -> bool:  # the keeper writes the fence into the session right after the kill
        session = sessions.load(conf.journal_dir, str(job), host="n2")
        marks.append(None if session is None else session.details.get("fenced"))
        return marks[-1] is not None or session is None

    wait_for(marked, 10, "n2's keeper to mark the session fenced", every=0.02)
    assert marks[-1] is not None and "past the grace" in str(marks[-1]), marks[-5:]
    outcomes_after: list[dict[str, object]] = []

    def reconciled() -> bool:
        if after_thaw == "sweeper":
            outcomes_after.extend(mentions(sweep_on(bed, "n1"), job)[0])
        return not session_open(conf, job, "n2")

    wait_for(reconciled, 120, "the frozen job's end after the thaw", every=1.0 if after_thaw == "sweeper" else 0.1)
    clean_took = time.monotonic() - thawed
    for _ in range(2):  # later sweeps find nothing left to do
        assert mentions(sweep_on(bed, "n1"), job)[0] == []
    state = bed.wait_finished(job, timeout=120)
    revs = revisions_of(image, job)
    print(f"freeze: first 'frozen holder' sweep {attempt_at:.1f}s after the freeze ({sweeps} sweeps, longest "
          f"{longest:.1f}s); thaw -> fenced (lock gone) {fence_took:.2f}s; thaw -> reconciled and closed "
          f"{clean_took:.1f}s; job {state}; sweeper outcomes after thaw: "
          f"{[(o['result'], o.get('detail')) for o in outcomes_after]}; revisions {len(revs)} by {[r['who'] for r in revs]}; "
          f"fence: {marks[-1]}")
    assert state not in ("COMPLETED", "RUNNING", "PENDING"), state
    second_state = bed.wait_finished(second, timeout=180)
    second_out = (bed_out / "second.out").read_text() if (bed_out / "second.out").exists() else ""
    print(f"freeze: second writer on n1: {second_frozen} while n2 was frozen, ended {second_state}: "
          f"{second_out.strip()[-300:]!r}")
    wait_for(lambda: holder(conf, image) is None and not session_open(conf, second, "n1"), 120,
             "the second job's end")
    if second_state == "COMPLETED":  # started after the reconcile: its write is there
        assert overlay_file(image, "second.log") == f"{second} second\n"
    else:  # refused by the lease while the frozen holder had the image
        assert second_state == "FAILED" and "held by" in second_out, (second_state, second_out)
        assert overlay_file(image, "second.log") == ""
    assert len(revs) == 1 and revs[0]["who"]["exit_state"] != "COMPLETED", revs  # type: ignore[index]
    winner = (revs[0]["who"]["node"], revs[0]["who"]["via"])  # type: ignore[index]
    if after_thaw == "sweeper":
        # n1's sweeper and n2's own job end (its Epilog's reconcile worker claiming the
        # expired lease, slurm/reclaim.py) race to break the lease n2 still names: one
        # rename, exactly one wins (both orders are forced in tests/slurm/test_own_lease_race.py).
        # Which one depends on when n2's slurmd re-registers after the thaw (CI: n2 in 1.5 s).
        assert winner in (("n1", "sweeper"), ("n2", "worker"), ("n2", "epilog")), revs
    else:
        assert winner[0] == "n2", revs
    assert_prefix(overlay_file(image, "progress.log"), job)
    assert_consistent(image)
    assert holder(conf, image) is None
    assert overlay_status(image).endswith("clean") or "in sync" in overlay_status(image), overlay_status(image)
    # The next writer after the thaw gets a clean image and writes.
    third = bed.sbatch(alice, "-w", "n1", f"--oci-sif-overlay={image}", "-o", "/dev/null", "-D", "/",
                       "--wrap", 'echo "$SLURM_JOB_ID third" >> /third.log')
    assert bed.wait_finished(third, timeout=180) == "COMPLETED"
    assert overlay_file(image, "third.log") == f"{third} third\n"
    wait_for(lambda: holder(conf, image) is None and not session_open(conf, third, "n1"), 120,
             "the third job's reconcile")
    assert_consistent(image)
