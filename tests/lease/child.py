"""Subprocess helper for the lease tests: takes a lease (or a POSIX lock) and reports.

usage: child.py acquire|shared IMAGE JOB OFFSET SIZE TTL HOLD_SECONDS [START_AT]
       child.py posix-write|posix-read IMAGE OFFSET SIZE HOLD_SECONDS
       child.py break IMAGE START_AT
Prints one line: "WIN <token>", "BUSY <message>", "LOCKED", "BROKE True|False"; then holds.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import time

from sifoverlay.engine import lease
from sifoverlay.errors import ImageBusy


def wait_until(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def main(argv: list[str]) -> int:
    verb = argv[0]
    if verb in ("acquire", "shared"):
        image, job, offset, size, ttl, hold = argv[1:7]
        if len(argv) > 7:
            wait_until(float(argv[7]))
        take = lease.acquire if verb == "acquire" else lease.acquire_shared
        try:
            held = take(image, lease.Holder.current(job, "test"), ttl=float(ttl), region=(int(offset), int(size)))
        except ImageBusy as exc:
            print("BUSY", exc, flush=True)
            return 75
        print("WIN", held.token, flush=True)
        time.sleep(float(hold))
        held.release()
        return 0
    if verb.startswith("posix-"):
        image, offset, size, hold = argv[1:5]
        write = verb == "posix-write"
        fd = os.open(image, os.O_RDWR if write else os.O_RDONLY)
        ltype = fcntl.F_WRLCK if write else fcntl.F_RDLCK
        try:  # F_SETLK: a classic POSIX record lock, what SingularityCE native mode takes
            fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", ltype, 0, int(offset), int(size), 0))
        except OSError as exc:
            print("BUSY", exc.errno, flush=True)
            return 75
        print("LOCKED", flush=True)
        time.sleep(float(hold))
        return 0
    if verb == "break":
        wait_until(float(argv[2]))
        print("BROKE", lease.break_stale(argv[1]), flush=True)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
