"""The exporter's scan: the drift state of every image under the configured scan paths,
cheap enough to run every few seconds over thousands of images.

Per image and scan: one stat, one 1 KiB superblock pread (`ext3.Superblock.read`), one
lease-file lookup (`engine.lease.inspect`) and one byte-range lock probe
(`engine.quiesce.byte_range_lock`). The SIF metadata (overlay offset and size, recorded
digest and fingerprint, via `ocisif.open_image`) is parsed again only when the file's
(st_dev, st_ino, st_size, st_mtime_ns) changed: every write to an image moves its mtime.
FUSE mounts, FUSE daemons' open files and loop devices are listed once per scan
(`mounted_files`); an image that shows any sign of
use is handed to `engine.status`, which alone decides `in-use`. Without such a sign the
state follows engine.status's rules for an unhashed, quiet overlay (no fingerprint ->
unknown, fingerprint equal -> clean, else modified); tests/metrics check the two agree.

Hashing (modified/unknown -> drift/clean) is `verify`, called by the exporter's slower
schedule through `engine.status(verify=True)` under a byte-rate limit.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from sifoverlay import engine
from sifoverlay.engine import lease
from sifoverlay.engine.journal import Journal
from sifoverlay.engine.quiesce import byte_range_lock
from sifoverlay.errors import OverlayStateError
from sifoverlay.ext3 import Superblock
from sifoverlay.ocisif import open_image

log = logging.getLogger(__name__)

SIF_SUFFIX: Final = ".sif"
FUSE_DAEMONS: Final = ("fuse2fs", "squashfuse", "squashfuse_ll", "fuse-overlayfs")
_OCTAL = re.compile(r"\\([0-7]{3})")
FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True, slots=True)
class ImageReport:
    """One image in one scan. `state` is one of names.STATES; `error` set -> unknown."""

    image: str
    state: str
    overlay_size: int | None = None
    free_bytes: int | None = None
    last_reconcile: float | None = None
    error: str | None = None
    free_inodes: int | None = None
    free_descriptors: int | None = None
    revisions: int | None = None  # newest revision's sequence number (issue 18)


@dataclass(frozen=True, slots=True)
class Snapshot:
    images: tuple[ImageReport, ...]
    journal_pending: int
    journal_oldest_age: float
    leases_held: int
    leases_stale: int
    seconds: float
    finished: float
    verify_queue: int


@dataclass(slots=True)
class _Known:
    """What the last scans learnt about one image (mutable cache entry, scanner-private)."""

    key: FileKey
    offset: int
    size: int
    recorded_digest: str
    recorded_fp: dict[str, Any] | None
    last_reconcile: float | None = None
    fp_now: dict[str, Any] | None = None
    state: str = "unknown"
    verified: tuple[FileKey, dict[str, Any], str] | None = field(default=None)  # key, fp, state
    free_descriptors: int | None = None
    revisions: int | None = None


class VerifyStopped(Exception):
    """Raised from the hashing progress callback when the exporter shuts down."""


class RateBudget:
    """One byte rate shared by the hashing threads of a verify pass: each RateLimit adds
    what it hashed, and all of them together stay under `bytes_per_second`."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second if bytes_per_second and bytes_per_second > 0 else None
        self.started = time.monotonic()
        self.done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> float:
        """Count `nbytes` more; the seconds the caller should wait to stay under the rate."""
        with self._lock:
            self.done += nbytes
            if self.rate is None:
                return 0.0
            return self.done / self.rate - (time.monotonic() - self.started)


class RateLimit:
    """A progress callback that sleeps so hashing stays under `bytes_per_second` (or,
    with `budget`, under the budget's rate shared with other images hashed meanwhile)."""

    def __init__(self, bytes_per_second: float | None, stop: threading.Event | None = None, *,
                 budget: RateBudget | None = None) -> None:
        self.rate = bytes_per_second if bytes_per_second and bytes_per_second > 0 else None
        self.stop = stop
        self.started = time.monotonic()
        self.done = 0
        self.budget = budget

    def __call__(self, done: int, total: int) -> None:
        delta, self.done = done - self.done, done
        if self.stop is not None and self.stop.is_set():
            raise VerifyStopped("exporter stopping")
        if self.budget is not None:
            ahead = self.budget.add(delta)
        elif self.rate is None:
            return
        else:
            ahead = done / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            if self.stop is not None:
                if self.stop.wait(ahead):
                    raise VerifyStopped("exporter stopping")
            else:
                time.sleep(ahead)


def discover(scan_paths: Iterable[str]) -> list[str]:
    """Absolute paths of the images to scan: each file given, and the `*.sif` regular
    files directly inside each directory given (not recursive, hidden files skipped)."""
    found: dict[str, None] = {}
    for given in scan_paths:
        path = os.path.abspath(given)
        if os.path.isdir(path):
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError as exc:
                log.warning("%s: cannot list scan directory: %s", path, exc.strerror)
                continue
            for entry in entries:
                if entry.name.endswith(SIF_SUFFIX) and not entry.name.startswith(".") and entry.is_file():
                    found[entry.path] = None
        elif os.path.exists(path):
            found[path] = None
        else:
            log.warning("%s: scan path does not exist", path)
    return list(found)


def _unescape(field_text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_text)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def mounted_files(mountinfo: str = "/proc/self/mountinfo", sys_block: str = "/sys/block") -> set[tuple[int, int] | str]:
    """(dev, ino) of every file that backs a FUSE mount or a loop device right now: the
    images that need a full `engine.status` look (quiesce decides what the use means).
    A FUSE source that does not resolve from here (fuse2fs records the path as typed,
    e.g. relative to the mounter's cwd) adds its base name instead."""
    ids: set[tuple[int, int] | str] = set()
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, sep, right = line.partition(" - ")
        tail = right.split()
        if sep and len(tail) >= 2 and tail[0].startswith("fuse"):
            source = _unescape(tail[1])
            ids.add(_file_id(source) or os.path.basename(source))
    ids.update(_fuse_daemon_files())
    try:
        names = [n for n in os.listdir(sys_block) if n.startswith("loop")]
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(sys_block, name, "loop", "backing_file"), encoding="utf-8", errors="replace") as f:
                backing = f.read().strip()
        except OSError:
            continue
        found = _file_id(backing)
        if found:
            ids.add(found)
    return ids


def _fuse_daemon_files(proc: str = "/proc") -> set[tuple[int, int]]:
    """Files held open by FUSE daemons: a mount given /proc/self/fd/N as its source names
    the mounter's fd, which only the daemon's fd table resolves."""
    ids: set[tuple[int, int]] = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return ids
    for pid in pids:
        try:
            with open(os.path.join(proc, pid, "comm"), encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
            if comm not in FUSE_DAEMONS:
                continue
            fds = os.listdir(os.path.join(proc, pid, "fd"))
        except OSError:
            continue
        fuse_mounts = _fuse_mount_ids(os.path.join(proc, pid, "mountinfo"))
        for fd in fds:
            if _mount_id(os.path.join(proc, pid, "fdinfo", fd)) in fuse_mounts:
                continue  # a file inside a FUSE mount: stat() would hang on a stopped daemon, and no image is held so
            found = _file_id(os.path.join(proc, pid, "fd", fd))
            if found:
                ids.add(found)
    return ids


def _fuse_mount_ids(mountinfo: str) -> set[int]:
    """Mount ids of the FUSE filesystems in a process's mount table."""
    out: set[int] = set()
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and fields and fields[0].isdigit() and tail and tail[0].startswith("fuse"):
            out.add(int(fields[0]))
    return out


def _mount_id(fdinfo: str) -> int | None:
    """The mnt_id of an open file (/proc/PID/fdinfo/FD), read without touching the file."""
    try:
        with open(fdinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _newest_revision(sif: Any) -> int | None:
    """The image's newest revision's sequence number (0: no history; issue 18), None when
    the history is unreadable."""
    from sifoverlay.errors import SifOverlayError
    from sifoverlay.ocisif import history

    try:
        found = history.read(sif)
    except SifOverlayError:
        return None
    return found.next_seq - 1


class Scanner:
    """Scans the images under `scan_paths`; thread-safe (one scan or verify at a time
    mutates the cache; readers take `latest`)."""

    def __init__(self, scan_paths: Iterable[str], *, journal_dir: str | None = None) -> None:
        self.scan_paths = tuple(scan_paths)
        self.journal_dir = journal_dir
        self.latest: Snapshot | None = None
        self.verified_bytes = 0  # hashed by `verify`, for sifoverlay_hashed_bytes_total{source="verify"}
        self._known: dict[str, _Known] = {}
        self._reported: dict[str, FileKey] = {}  # broken images already warned about
        self._lock = threading.Lock()

    # -- the scan ----------------------------------------------------------------------
    def scan(self) -> Snapshot:
        start = time.monotonic()
        with self._lock:
            images = discover(self.scan_paths)
            in_use_candidates = mounted_files()
            reports, held, stale = [], 0, 0
            for path in images:
                report, lease_state = self._scan_one(path, in_use_candidates)
                if report is None:
                    continue
                reports.append(report)
                held += lease_state == "held"
                stale += lease_state == "stale"
            present = set(images)
            for gone in set(self._known) - present:
                del self._known[gone]
            for gone in set(self._reported) - present:
                del self._reported[gone]
            journal = Journal(self.journal_dir)
            pending = len(journal.pending())
            oldest = (journal.oldest_age() or 0.0) if pending else 0.0
            queue = len(self._verify_candidates())
        snapshot = Snapshot(tuple(reports), pending, oldest, held, stale, time.monotonic() - start, time.time(), queue)
        self.latest = snapshot
        log.debug("scanned %d images in %.3f s", len(reports), snapshot.seconds)
        return snapshot

    def _scan_one(self, path: str, candidates: set[tuple[int, int] | str]) -> tuple[ImageReport | None, str | None]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._known.pop(path, None)
            return None, None  # vanished since discovery
        key: FileKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            known = self._known.get(path)
            if known is None or known.key != key:
                known = self._known[path] = self._refresh(path, key, known)
            sb = Superblock.read(path, known.offset, size=known.size)
            known.fp_now = sb.fingerprint()
            info = lease.inspect(path)
            lease_state = None if info is None else ("held" if info.is_alive() else "stale")
            busy = ((st.st_dev, st.st_ino) in candidates or os.path.basename(path) in candidates
                    or lease_state == "held" or byte_range_lock(path, known.offset, known.size, writers_only=True))
            if busy:
                known.state = self._engine_state(path)
            elif known.recorded_fp is None:
                known.state = "unknown"
            else:
                known.state = "clean" if known.fp_now == known.recorded_fp else "modified"
            if known.state in ("modified", "unknown") and known.verified is not None:
                vkey, vfp, vstate = known.verified
                if vkey == key and vfp == known.fp_now:
                    known.state = vstate
            if known.state == "clean":
                known.last_reconcile = st.st_mtime  # the reconcile's commit was the file's last write
        except Exception as exc:  # noqa: BLE001 - one bad image is counted as an error, never stops the scan
            self._known.pop(path, None)
            # Warn once per file state, not on every scan of a file that stays broken.
            (log.debug if self._reported.get(path) == key else log.warning)("%s: cannot scan: %s", path, exc)
            self._reported[path] = key
            return ImageReport(path, "unknown", error=type(exc).__name__), None
        return ImageReport(path, known.state, known.size, sb.free_bytes, known.last_reconcile,
                           free_inodes=sb.free_inodes, free_descriptors=known.free_descriptors,
                           revisions=known.revisions), lease_state

    def _refresh(self, path: str, key: FileKey, old: _Known | None) -> _Known:
        """Re-read the overlay's metadata after the file changed."""
        with open_image(path) as img:
            overlay = img.overlay
            if overlay is None:
                raise OverlayStateError(path, "image does not contain a writable overlay (last layer is not ext3)")
            known = _Known(key, overlay.offset, overlay.size, overlay.recorded_digest, overlay.fingerprint)
            known.free_descriptors = sum(1 for d in img.sif.descriptors if not d.is_used)
            known.revisions = _newest_revision(img.sif)
        if old is not None:
            known.verified = old.verified
            if (old.recorded_digest, old.recorded_fp) == (known.recorded_digest, known.recorded_fp):
                known.last_reconcile = old.last_reconcile
        if known.last_reconcile is None and known.recorded_fp is not None:
            # Not clean at first sight: the superblock write time recorded at the last
            # reconcile is the best lower bound we have.
            wtime = known.recorded_fp.get("wtime")
            known.last_reconcile = float(wtime) if isinstance(wtime, int) and wtime > 0 else None
        return known

    def _engine_state(self, path: str) -> str:
        return engine.status(path, verify=False, journal_dir=self.journal_dir).state

    # -- the verify schedule -------------------------------------------------------------
    def _verify_candidates(self) -> list[str]:
        out = []
        for path, known in self._known.items():
            if known.state not in ("modified", "unknown"):
                continue
            if known.verified is not None and known.verified[0] == known.key and known.verified[1] == known.fp_now:
                continue
            out.append(path)
        return out

    def verify_candidates(self) -> list[str]:
        """Images whose last scan said modified/unknown and that were not hashed since."""
        with self._lock:
            return self._verify_candidates()

    def verify(self, path: str, *, rate: RateLimit | None = None) -> str | None:
        """Hash one image (engine.status verify=True) and remember the verdict for the
        file state it was taken on. Returns the verified state, None if it vanished."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key: FileKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        limiter = rate or RateLimit(None)
        try:
            result = engine.status(path, verify=True, journal_dir=self.journal_dir, progress=limiter)
        finally:
            with self._lock:  # verify runs on several threads (run_verify_pass)
                self.verified_bytes += limiter.done
        with self._lock:
            known = self._known.get(path)
            if known is not None and result.actual_digest is not None:
                known.verified = (key, result.fingerprint_now, result.state)
        log.info("%s: verified: %s", path, result.state)
        return result.state


def verify_workers() -> int:
    """Hashing threads of a verify pass: one per core the process may run on (sha256 and
    the reads release the GIL; more threads than cores only share the same cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_verify_pass(scanner: Scanner, *, rate_bytes: float | None, stop: threading.Event,
                    on_error: Callable[[str, Exception], None] | None = None, workers: int | None = None) -> int:
    """Hash every current candidate once (stops early on `stop`); returns how many.

    At most `workers` images (default verify_workers()) are hashed at a time, by a pool of
    threads: one image's reads overlap another's hashing, and each core hashes one image.
    `rate_bytes` bounds the pass as a whole (one RateBudget), not each thread."""
    candidates = scanner.verify_candidates()
    count = workers if workers is not None else verify_workers()
    if count < 1:
        raise ValueError(f"run_verify_pass: workers must be >= 1, got {count}")
    budget = RateBudget(rate_bytes)
    stopped = threading.Event()  # a VerifyStopped in one thread ends the others' queue too

    def one(path: str) -> bool:
        if stop.is_set() or stopped.is_set():
            return False
        try:
            scanner.verify(path, rate=RateLimit(rate_bytes, stop, budget=budget))
            return True
        except VerifyStopped:
            stopped.set()
            return False
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the pass
            log.warning("%s: verify failed: %s", path, exc)
            if on_error is not None:
                on_error(path, exc)
            return False

    count = min(count, len(candidates))
    if count <= 1:
        return sum(one(path) for path in candidates)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="sifoverlay-verify") as pool:
        return sum(pool.map(one, candidates))
