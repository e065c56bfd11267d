"""A job end whose own lease has expired wins it back before reconciling, or touches nothing.

While the job's keeper renews the lease, the job end (Epilog or reconcile worker) syncs
inside it and nobody else may break it. Once the keeper is gone (the node was frozen or
cut off past ttl + grace and fenced on wake-up, or the keeper died) the lease is stale,
and another node's sweeper or a next job's Prolog may break it at the same moment this
node's job end starts to reconcile: two writers in one commit. So the job end first
breaks its own expired lease through the one primitive every breaker uses
(engine/leasestale.break_file: a rename that exactly one party wins):

* won: the session forgets the broken token (a later job end still reconciles it, see
  jobend._lost_lease) and the sync takes a lease of its own, heartbeated while it hashes,
  as the sweeper does after a takeover;
* lost: someone else broke it first and reconciles; this job end writes nothing, marks
  the session `fenced` and leaves it to the winner to close. docs/slurm.md "Leases,
  heartbeats and fencing".
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sifoverlay.fsio import REAL_IO, FileIO

from .config import SlurmConfig

__all__ = ["expired_lease"]

log = logging.getLogger(__name__)


def expired_lease(session: Any, config: SlurmConfig, *, io: FileIO = REAL_IO) -> str | None:
    """None: reconcile (the lease is renewed by a live keeper, or was just won back);
    else why the job lost its lease (it ends `fenced`). Sessions without a token (older
    Prologs, or a lease already won back) go on as before."""
    from sifoverlay.engine import lease, leasestale, procs, sessions

    from . import keeper

    token, key = session.details.get("token"), session.details.get("key")
    if not token or not key:
        return None
    info = lease.inspect(key=str(key), state_dir=config.state_dir)
    if info is None or info.token != token:
        return _lost(session, config, "the lease record is gone" if info is None else f"now held by {info.describe()}",
                     io)
    keeper_gone = bool(info.record.get("keeper")) and lease.held_here(info) and not procs.process_alive(
        info.pid, info.started)
    if time.time() <= info.expires and not keeper_gone:
        return None
    keeper.stop(info)  # a keeper that saw its record vanish would fence and mark the session
    if not leasestale.break_file(info.path, info.inode, io=io):
        now = lease.inspect(key=str(key), state_dir=config.state_dir)
        why = f"now held by {now.describe()}" if now is not None else "broken by another node"
        return _lost(session, config, f"lost the break of its expired lease ({why})", io)
    sessions.amend(config.journal_dir, session.job_id, {"token": "", "reclaimed": time.time(), "broken_token": token},
                   io=io, host=session.host)
    log.warning("job %s: its lease on %s had expired (heartbeat %.1f s ago): broken by its own job end, which "
                "reconciles under a new lease", session.job_id, session.image, time.time() - info.heartbeat)
    return None


def _lost(session: Any, config: SlurmConfig, why: str, io: FileIO) -> str:
    from sifoverlay.engine import sessions

    log.error("job %s: its lease on %s was lost (%s): not reconciled here", session.job_id, session.image, why)
    sessions.amend(config.journal_dir, session.job_id, {"fenced": why, "fenced_at": time.time()}, io=io,
                   host=session.host)
    return why
