"""A :ro job's Prolog parses the image's metadata under the metadata read lock
(engine/leaselock.metadata_lock; a commit of the previous writer's job end may run beside
it, engine/lease.py phase "reconciling"), and lets it go while it waits for a holder: the
commit it waits for takes that lock, and holding it meanwhile made a reader and a worker
wait 30 s for each other on the live cluster."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from sifoverlay.engine import lease, leaselock
from sifoverlay.errors import ImageBusy
from sifoverlay.slurm import prolog
from sifoverlay.slurm.config import SlurmConfig
from sifoverlay.slurm.jobenv import JobEnv
from tests.slurm.test_epilog_metrics import _lease_by_exited_process, config, overlay_image  # noqa: F401


def _commit_could_lock(image: Path) -> bool:
    """Would a commit get the metadata write lock now (without waiting)?"""
    fd = os.open(image, os.O_RDWR)
    try:
        with leaselock.metadata_lock(fd, exclusive=True, timeout=0.0) as granted:
            return granted
    finally:
        os.close(fd)


def _reader(job_id: str) -> JobEnv:
    return JobEnv(job_id=job_id, uid=os.getuid(), gid=os.getgid(), user=None, image=None, mode="ro", work_dir=None)


def test_the_parse_lock_is_let_go_while_the_reader_waits(overlay_image: Path, config: SlurmConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _lease_by_exited_process(overlay_image, "70", ttl=365 * 24 * 3600.0)  # a writer, not admitting readers
    seen: list[bool] = []

    def waiting(identity: object, job: object, config: object) -> bool:
        seen.append(_commit_could_lock(overlay_image))
        return False  # the holder did not go: the Prolog refuses

    monkeypatch.setattr(prolog, "_finish_dead_holders", lambda identity, config: False)
    monkeypatch.setattr(prolog, "_wait_for_ending_holders", waiting)
    fd = os.open(overlay_image, os.O_RDONLY)
    try:
        parsing = prolog._ParseLock(fd, enabled=True)
        identity = SimpleNamespace(path=str(overlay_image), fd=fd)
        with pytest.raises(ImageBusy, match="held by job 70"):
            prolog._take_lease(identity, _reader("71"), config, parsing)  # type: ignore[arg-type]
        assert seen == [True]  # while it waited, a commit could have gone on
        assert _commit_could_lock(overlay_image)  # and nothing is held after the refusal
    finally:
        os.close(fd)


def test_the_parse_lock_is_held_from_the_lease_on_beside_a_reconciling_writer(
        overlay_image: Path, config: SlurmConfig) -> None:
    _lease_by_exited_process(overlay_image, "80", ttl=365 * 24 * 3600.0)
    writer = lease.resume(overlay_image, "80", state_dir=config.state_dir)
    assert writer is not None
    writer.set_phase(lease.READERS_ADMITTED)
    fd = os.open(overlay_image, os.O_RDONLY)
    try:
        parsing = prolog._ParseLock(fd, enabled=True)
        identity = SimpleNamespace(path=str(overlay_image), fd=fd)
        held = prolog._take_lease(identity, _reader("81"), config, parsing)  # type: ignore[arg-type]
        assert held.shared and held.info.job_id == "81"
        assert not _commit_could_lock(overlay_image)  # the reader still parses: the commit waits
        parsing.release()
        assert _commit_could_lock(overlay_image)
        held.release()
    finally:
        os.close(fd)
        writer.release()
