"""Finding 8: recovery by path.

`engine.recover` opened `intent.image` by path without O_NOFOLLOW and never compared the
(dev, ino) the journal stores: a symlink there made root recover another file, and one
symlinked image (ELOOP) aborted the sweeper's whole pass, so every other interrupted
image stayed unrecovered.

Here two rw operations are interrupted right after their INTENT is durable (in the
cluster's real journal directory): one on the attacker's image, one on the victim's.
The attacker then replaces her image's name by a symlink loop, then by a symlink to the
victim's image. The real sweeper pass (`sifoverlay recover --slurm`) must recover the
victim's entry, report the attacker's as failed (entry kept), never write through the
attacker's name, and end in bounded time; the victim's next rw job runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sifoverlay.errors import SifOverlayError
from tests.security.h3_support import (
    assert_node_not_drained, outdir_for, overlay_offset, set_ext3_dirty, snapshot, sweep, user_dir, victim_rw_job_runs,
)
from tests.slurm.conftest import (  # noqa: F401 - fixtures
    Cluster, User, base_images, cluster, image_dir, imported_image, make_image, node_stays_idle, slurm_users,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]


def _interrupt_sync_after_intent(image: Path, journal_dir: Path, state_dir: str) -> None:
    """What a sync killed right after its INTENT became durable leaves: a journal entry in
    state INTENT (before-image = the image's current metadata; nothing appended yet), written
    through the real Journal API exactly as engine.commit writes it."""
    import time

    from sifoverlay.engine import statedir
    from sifoverlay.engine.journal import Intent, Journal, new_op_id
    from sifoverlay.sif.load import SifFile

    with statedir.using(state_dir):
        with SifFile.open(str(image)) as sif:
            meta = sif.metadata_bytes()
            st = os.fstat(sif.fd)
            key = statedir.identity_key(sif.fd)
        intent = Intent(
            op_id=new_op_id(), op="sync", image=str(image), dev=st.st_dev, ino=st.st_ino,
            old_length=st.st_size, new_length=st.st_size + 4096, old_root_digest=None,
            new_root_digest="sha256:" + "0" * 64, appended=(), freed=(), before=meta, after=meta,
            job=None, host=os.uname().nodename, pid=os.getpid(), created=time.time(), key=key,
        )
        writer = Journal(journal_dir).begin(intent)
        writer.abandon()  # the writer "dies" here: INTENT durable, image untouched


def test_sweeper_pass_survives_a_symlinked_image_and_recovers_the_rest(
    cluster: Cluster, slurm_users: tuple[User, User], make_image, image_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    from sifoverlay.engine.journal import Journal
    from sifoverlay.slurm.config import load_config

    alice, bob = slurm_users
    state_dir = load_config().state_dir
    outdir = outdir_for(image_dir)
    home_a = user_dir(image_dir, "alice", alice)
    home_b = user_dir(image_dir, "bob", bob)
    mine = make_image(alice, "img.sif", where=home_a)
    victim = make_image(bob, "img.sif", where=home_b)
    journal = Journal(cluster.journal_dir)
    for image in (mine, victim):
        _interrupt_sync_after_intent(image, cluster.journal_dir, state_dir)
    pending = {e.intent.image: e for e in journal.pending() if e.intent is not None}
    assert {str(mine), str(victim)} <= set(pending)

    # The attacker swaps her image's name for a symlink to the victim's image: the old
    # recover followed it into the lease's O_NOFOLLOW open, got ELOOP and aborted the
    # whole pass (the victim's own entry was never recovered).
    before = snapshot(victim)
    os.rename(mine, home_a / "moved.sif")
    os.symlink(victim, mine)
    report = json.loads(sweep(cluster).stdout)
    by_image = {o["image"]: o for o in report["outcomes"]}
    assert by_image[str(victim)]["outcome"] == "rolled-back", report  # the pass went on
    assert by_image[str(mine)]["outcome"] == "failed", report
    assert any(e.intent is not None and e.intent.image == str(mine) for e in journal.pending()), "entry must be kept"
    assert snapshot(victim) == before  # rolled back = before-image: not one byte written

    # Then a symlink loop (ELOOP for anyone following it): still reported, never fatal.
    os.unlink(mine)
    os.symlink("img.sif", mine)
    report = json.loads(sweep(cluster).stdout)
    assert {o["image"]: o["outcome"] for o in report["outcomes"]}.get(str(mine)) == "failed", report

    # The attacker's real file comes back under its name: its entry is recovered on it.
    os.unlink(mine)
    os.rename(home_a / "moved.sif", mine)
    report = json.loads(sweep(cluster).stdout)
    assert {o["image"]: o["outcome"] for o in report["outcomes"]}.get(str(mine)) == "rolled-back", report
    assert not [e for e in journal.pending() if e.intent is not None and e.intent.image in (str(mine), str(victim))]
    assert_node_not_drained(cluster)
    victim_rw_job_runs(cluster, bob, victim, outdir)


def test_recover_of_a_fifo_name_never_blocks(tmp_path: Path) -> None:
    """A FIFO under the journalled name: the checked open refuses it at once (O_NONBLOCK,
    S_ISREG); recovery reports failure instead of hanging."""
    import signal

    from sifoverlay.engine import statedir

    fifo = tmp_path / "img.sif"
    os.mkfifo(fifo)
    signal.alarm(20)
    try:
        with pytest.raises(OSError):
            statedir.open_image_checked(str(fifo), writable=True)
    finally:
        signal.alarm(0)
    with pytest.raises(SifOverlayError):
        from sifoverlay.sif.load import SifFile

        signal.alarm(20)
        try:
            SifFile.open(str(fifo))
        finally:
            signal.alarm(0)
