"""Create an ext3 overlay filesystem image shaped like `singularity overlay create`.

The image holds `upper/` (0755) and `work/` (0700), owned by the given uid/gid, made with
`mkfs.ext3 -d` from a staging directory (ocisif-format §3.1). Singularity zero-fills the
file unless --sparse; mke2fs would punch the zeros out again through discard, so the
zero-filled variant passes `-E nodiscard` to keep the space really allocated.
"""

from __future__ import annotations

import logging
import os
import tempfile

from sifoverlay.errors import UsageError
from sifoverlay.fsio import REAL_IO, FileIO

from .superblock import check_region_header
from .tools import run_tool

log = logging.getLogger(__name__)

MIN_OVERLAY_MIB = 64
_ZERO_CHUNK = 4 << 20


def _write_zeros(fd: int, length: int, io: FileIO) -> None:
    chunk = bytes(min(_ZERO_CHUNK, length))
    pos = 0
    while pos < length:
        n = min(len(chunk), length - pos)
        io.pwrite(fd, memoryview(chunk)[:n], pos)
        pos += n


def _build_staging(root: str, uid: int | None, gid: int | None, io: FileIO) -> None:
    """root/upper (0755) and root/work (0700), plus root itself, owned by uid/gid."""
    io.chmod(root, 0o755)
    for name, mode in (("upper", 0o755), ("work", 0o700)):
        sub = os.path.join(root, name)
        io.mkdir(sub, mode)
        io.chmod(sub, mode)  # mkdir honours the umask; the modes must be exact
    if uid is not None or gid is not None:
        owner = -1 if uid is None else uid
        group = -1 if gid is None else gid
        for path in (root, os.path.join(root, "upper"), os.path.join(root, "work")):
            os.chown(path, owner, group)  # io-seam: exempt (throw-away staging dir; FileIO has no chown)


STAGING_PREFIX = ".sifoverlay-mkfs-"


def _host_tag() -> str:
    return "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"


def sweep_dead_staging() -> list[str]:
    """Remove staging dirs ``<tmp>/.sifoverlay-mkfs-<host>-<pid>-*`` whose process is gone
    from this host: a SIGKILLed create runs no cleanup (TemporaryDirectory's included)."""
    import shutil

    directory = tempfile.gettempdir()
    mine = f"{STAGING_PREFIX}{_host_tag()}-"
    removed = []
    for name in os.listdir(directory):
        pid = name[len(mine):].split("-", 1)[0] if name.startswith(mine) else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's: EPERM below)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)  # io-seam: exempt (a dead create's throw-away staging dir)
        removed.append(os.path.join(directory, name))
    return removed


def make_overlay_fs(
    path: str | os.PathLike[str],
    size_mib: int,
    *,
    sparse: bool = False,
    uid: int | None = None,
    gid: int | None = None,
    io: FileIO = REAL_IO,
) -> None:
    """Create a new ext3 image file of exactly size_mib MiB at `path`.

    The file must not exist. On any failure it is removed again (nothing half-written).
    Raises UsageError (size < 64 MiB, file exists) or ExternalToolError (mkfs failed).
    """
    target = os.fspath(path)
    if not isinstance(size_mib, int) or size_mib < MIN_OVERLAY_MIB:
        raise UsageError(target, f"overlay size must be at least {MIN_OVERLAY_MIB} MiB, got {size_mib}")
    size = size_mib << 20
    try:
        fd = io.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(target, "cannot create overlay image: file already exists") from None
    try:
        try:
            if sparse:
                io.truncate(fd, size)
            else:
                _write_zeros(fd, size, io)
        finally:
            io.close(fd)
        sweep_dead_staging()
        with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-") as staging:
            _build_staging(staging, uid, gid, io)
            argv = ["mkfs.ext3", "-q", "-F"]
            if not sparse:
                argv += ["-E", "nodiscard"]
            argv += ["-d", staging, target]
            io.external("mkfs.ext3", [target], lambda: run_tool(argv, path=target))  # one opaque op to crash tests
        check_region_header(target, 0)  # mkfs must have produced what SingularityCE accepts
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            io.fsync(fd)  # mkfs wrote through its own descriptor
        finally:
            io.close(fd)
    except Exception:  # not BaseException: a simulated crash must leave the file behind
        try:
            io.unlink(target)
        except FileNotFoundError:
            pass
        raise
    log.info("created %d MiB ext3 overlay image %s (sparse=%s)", size_mib, target, sparse)
