"""Keep a lease alive from its own process, and notice first when it is lost (fencing).

A job's lease outlives the process that took it (Slurm: the Prolog). Its *keeper* renews
the heartbeat every `interval` seconds (record rewritten by temp + rename, the keeper
recorded as holder: host, boot_id, pid, start time) for as long as the job runs. A
keeper never releases: the job's end (Epilog) does, after stopping it.

Before every renewal the keeper judges whether the lease may have been lost; if so it
renews nothing and calls `fence` (kill whatever could still write the image, without
flushing) instead. The lease counts as lost when

  * the record is gone or carries another token (broken and perhaps retaken), or
  * by the shared wall clock, ``now + margin > expires + grace``: from ``expires + grace``
    on another host may break it (engine/leasestale.py), so it is treated as broken
    already (`margin` = min(grace/2, interval) covers the time between this check and
    the renewal's rename), or
  * by CLOCK_MONOTONIC, more than ``ttl + grace - margin`` seconds passed since the last
    renewal that succeeded (a frozen or descheduled keeper; a wall clock stepped
    backwards cannot hide it), or
  * renewals have failed for longer than `ttl` (storage unreachable): the keeper fences
    itself a whole `grace` before anyone else may break the lease.

A SIGSTOPped keeper cannot act while stopped; on SIGCONT its sleep has expired and the
first thing it does is this judgement (docs/slurm.md, "Leases, heartbeats and fencing").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sifoverlay.errors import ImageBusy
from sifoverlay.fsio import REAL_IO, FileIO

from .leasefile import LeaseInfo, read_info
from .leasestale import record_grace

__all__ = ["KeeperTiming", "judge", "keep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeeperTiming:
    """ttl: lease lifetime without a heartbeat; grace: extra time before another host may
    break it; interval: seconds between renewals (default ttl/3: two renewals may fail
    before the lease expires)."""

    ttl: float
    grace: float
    interval: float = 0.0

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.grace < 0:
            raise ValueError("ttl must be positive and grace not negative")
        if self.interval <= 0:
            object.__setattr__(self, "interval", self.ttl / 3)
        if self.interval >= self.ttl:
            raise ValueError("the renewal interval must be shorter than the ttl")

    @property
    def margin(self) -> float:
        """How long before "breakable by others" the keeper stops renewing: a renewal that
        starts then must land (temp write, fsync, rename) within this margin. A keeper on
        time renews at heartbeat + interval, a whole ttl + grace - interval away from it."""
        return min(self.grace / 2, self.interval)


def judge(info: LeaseInfo | None, token: str, timing: KeeperTiming, *, now: float, since_renewal: float) -> str | None:
    """Why the lease must be considered lost, or None when it is still safely ours.
    `now`: wall clock; `since_renewal`: CLOCK_MONOTONIC seconds since the last renewal
    that succeeded (or since the keeper started)."""
    if info is None:
        return "the lease record is gone (released or broken by someone else)"
    if info.token != token:
        return f"the lease was taken over: {info.describe()}"
    grace = max(timing.grace, record_grace(info))
    if now + timing.margin > info.expires + grace:
        return (f"the lease expired {now - info.expires:.1f} s ago, past the grace of {grace:g} s "
                "(another host may have broken it)")
    if since_renewal > timing.ttl + grace - timing.margin:
        return (f"no renewal for {since_renewal:.1f} s (monotonic), more than ttl {timing.ttl:g} s + grace "
                f"{grace:g} s: frozen or cut off")
    return None


def keep(
    lease_file: str,
    token: str,
    timing: KeeperTiming,
    *,
    fence: Callable[[str], None],
    ended: Callable[[], bool],
    stop: threading.Event | None = None,
    io: FileIO = REAL_IO,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> str:
    """Renew until the job ends ("ended": `ended()` true or `stop` set) or the lease is
    lost ("fenced": `fence(reason)` was called first). Never releases the lease."""
    from .lease import Lease

    stop = stop if stop is not None else threading.Event()
    last_ok = clock()
    failing_since: float | None = None
    while True:
        if stop.is_set() or ended():
            return "ended"
        unreadable: OSError | None = None
        info: LeaseInfo | None = None
        try:
            info = read_info_strict(lease_file)
        except OSError as exc:  # cannot read the state directory: cannot tell
            unreadable = exc
        if unreadable is None:
            reason = judge(info, token, timing, now=wall(), since_renewal=clock() - last_ok)
            if reason is not None and info is None and ended():
                return "ended"  # the Epilog released it between our two looks
            if reason is not None:
                log.error("%s: lease lost: %s: fencing", lease_file, reason)
                fence(reason)
                return "fenced"
            assert info is not None
            try:
                Lease(str(info.record.get("image", lease_file)), info, lease_file, None, io).heartbeat(
                    ttl=timing.ttl, keeper=True)
                last_ok, failing_since = clock(), None
            except ImageBusy:
                continue  # changed under us: judged again at once
            except OSError as exc:
                unreadable = exc
        if unreadable is not None:
            failing_since = clock() if failing_since is None else failing_since
            log.warning("%s: cannot renew the lease: %s", lease_file, unreadable)
            if clock() - last_ok > timing.ttl:
                reason = f"renewals failed for {clock() - last_ok:.1f} s (> ttl {timing.ttl:g} s): {unreadable}"
                log.error("%s: %s: fencing", lease_file, reason)
                fence(reason)
                return "fenced"
        stop.wait(timing.interval)


def read_info_strict(path: str) -> LeaseInfo | None:
    """Like leasefile.read_info, but an I/O error other than "no such file" raises
    instead of reading as "no lease" (an unreachable state directory is not a release)."""
    if os.path.lexists(path):
        return read_info(path)
    parent = os.path.dirname(path)
    os.stat(parent)  # raises when the state directory itself cannot be reached
    return None
