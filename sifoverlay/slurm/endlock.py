"""One process at a time ends a job's session on an image.

The Epilog, its reconcile worker (slurm/reconciler.py), the sweeper and a next job's
Prolog (which finishes dead holders) may all reach the same job end. Each first takes an
exclusive flock on ``<journal_dir>/sessions/.<job>@<host>.ending`` (root's own directory,
never a user path), without waiting: whoever does not get it leaves the job to the holder.
The lock lives in the open file description, so the Epilog hands it to its worker by fd
inheritance (no gap in which a sweeper could start a second reconcile) and a crashed worker
drops it with its last fd: the next sweep ends the job (crash-safety.md R10).

The file is unlinked by the holder before it closes; a taker that locked a file unlinked
meanwhile notices (the path names another inode, or none) and retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

__all__ = ["JobEndLock", "ending", "in_progress", "lock_path"]

_SUFFIX = ".ending"
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def lock_path(journal_dir: str, job_id: str, host: str) -> str:
    from sifoverlay.engine.sessions import session_path

    path = session_path(journal_dir, job_id, host=host)
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path).removesuffix(".json") + _SUFFIX)


class JobEndLock:
    """The held lock: `fd` may be inherited by a worker (`hand_over`), after which this
    process neither unlinks nor releases it (closing its copy keeps the worker's)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd, self.handed_over = path, fd, False

    def hand_over(self) -> None:
        self.handed_over = True

    def release(self) -> None:
        if self.fd < 0:
            return
        if not self.handed_over:
            with contextlib.suppress(OSError):
                if _same_file(self.path, self.fd):
                    os.unlink(self.path)  # io-seam: exempt (root's own lock file)
        os.close(self.fd)
        self.fd = -1

    @classmethod
    def adopt(cls, path: str, fd: int) -> JobEndLock:
        """A worker's inherited lock fd, checked to be the lock file at `path`."""
        if not _same_file(path, fd):
            raise OSError(f"fd {fd} is not the job-end lock {path}")
        return cls(path, fd)


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def take(journal_dir: str, job_id: str, host: str) -> JobEndLock | None:
    """The job-end lock of `job_id` on `host`, or None when another process holds it."""
    path = lock_path(journal_dir, job_id, host)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)  # io-seam: exempt (root's sessions dir)
    while True:
        fd = os.open(path, _OPEN_FLAGS, 0o600)  # io-seam: exempt (root's own lock file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return JobEndLock(path, fd)
        os.close(fd)  # its holder unlinked it after our open: take the new one


@contextlib.contextmanager
def ending(journal_dir: str, job_id: str, host: str) -> Iterator[JobEndLock | None]:
    held = take(journal_dir, job_id, host)
    try:
        yield held
    finally:
        if held is not None:
            held.release()


def in_progress(journal_dir: str, job_id: str) -> bool:
    """Some process (on any host of the shared journal directory) is ending `job_id` now
    ("": any job)."""
    from sifoverlay.engine.sessions import sessions_dir

    directory = sessions_dir(journal_dir)
    prefix = f".{job_id}@" if job_id else "."
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(_SUFFIX)]
    except FileNotFoundError:
        return False
    for name in names:
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # a probe's shared lock goes with its fd
    return False
