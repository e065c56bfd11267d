"""Convert an overlay upper directory into an OCI tar layer or a squashfs layer.

An ext3 overlay's `upper/` may follow either convention (ocisif-format §4,
test-stack-lowlevel §3):
* kernel overlayfs: a whiteout is a char 0:0 device (often hard links to one shared
  inode); an opaque dir has trusted.overlay.opaque=y (user.overlay.opaque=y with
  -o userxattr); copied-up entries carry stale trusted.overlay.origin / impure xattrs;
* fuse-overlayfs: a whiteout is an empty regular `.wh.NAME`; an opaque dir has a
  `.wh..wh..opq` sentinel plus the opaque xattr, and sometimes a stray char 0:0 named
  `.wh..opq` (SingularityCE #3176).
`walk_upper` normalizes both into one sorted stream of `UpperEntry`; the writers render
it as AUFS whiteouts (OCI tar) or overlayfs whiteouts (squashfs, through tar2sqfs,
because squashfs-tools 4.5.1 can neither exclude xattrs nor pass sqfstar -X options).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final, TypedDict

from sifoverlay.errors import OverlayStateError, UsageError
from sifoverlay.ext3.hashing import hash_range
from sifoverlay.fsio import REAL_IO, FileIO
from sifoverlay.ocisif.squashfs import HashingWriter, open_tar, run_tar2sqfs

log = logging.getLogger(__name__)

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
STRAY_OPAQUE: Final = ".wh..opq"
OPAQUE_XATTRS: Final = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
OVERLAY_OPAQUE_XATTR: Final = "trusted.overlay.opaque"

# Features whose meaning lives in the lower layers: an upper using them is not
# self-contained and cannot become a layer without the lowers.
_UNSUPPORTED_XATTRS: Final = {
    "overlay.metacopy": "metadata-only copy-up (metacopy=on): file data lives in a lower layer",
    "overlay.redirect": "renamed directory (redirect_dir=on) refers to a lower path",
}


@dataclass(frozen=True, slots=True)
class UpperEntry:
    """One normalized entry of an upper dir. `path` is relative, '/'-separated.

    kind: dir, file, hardlink (link = path of the first entry), symlink (link = target),
    whiteout (path names the deleted entry), char, block, fifo.
    """

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    source: str | None = None
    link: str | None = None
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    opaque: bool = False


class _StatFields(TypedDict):
    """The UpperEntry fields every real (non-whiteout) entry takes from its lstat."""

    mode: int
    uid: int
    gid: int
    mtime: int
    xattrs: tuple[tuple[str, bytes], ...]


def is_overlay_xattr(name: str) -> bool:
    """trusted./user.overlay.* and user.fuseoverlayfs.*: bookkeeping of one mount."""
    namespace, _, rest = name.partition(".")
    return (namespace in ("trusted", "user") and rest.startswith("overlay.")) or name.startswith(
        "user.fuseoverlayfs."
    )


def _read_xattrs(path: str) -> tuple[dict[str, bytes], bool]:
    """(kept xattrs, opaque) of one entry, refusing uppers that depend on their lowers."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}, False
        raise
    kept: dict[str, bytes] = {}
    opaque = False
    for name in names:
        if is_overlay_xattr(name):
            for suffix, why in _UNSUPPORTED_XATTRS.items():
                if name.endswith(suffix):
                    raise OverlayStateError(path, f"cannot convert the overlay upper: {why} ({name})")
            if name in OPAQUE_XATTRS and os.getxattr(path, name, follow_symlinks=False) == b"y":
                opaque = True
            continue
        kept[name] = os.getxattr(path, name, follow_symlinks=False)
    return kept, opaque


def _is_null_chardev(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@dataclass(slots=True)
class _Listing:
    """A directory's children, classified: real entries by name, whiteout names, marker."""

    real: dict[str, os.stat_result]
    whiteouts: set[str]
    has_opaque_marker: bool


def _list_dir(abs_dir: str) -> _Listing:
    real: dict[str, os.stat_result] = {}
    whiteouts: set[str] = set()
    marker = False
    with os.scandir(abs_dir) as it:
        for dent in it:
            st = dent.stat(follow_symlinks=False)
            name = dent.name
            if name == OPAQUE_MARKER:
                marker = True
            elif name == STRAY_OPAQUE and _is_null_chardev(st):
                continue  # fuse-overlayfs leftover next to the real marker
            elif name.startswith(WHITEOUT_PREFIX) and len(name) > len(WHITEOUT_PREFIX):
                whiteouts.add(name[len(WHITEOUT_PREFIX):])
            elif _is_null_chardev(st):
                whiteouts.add(name)
            else:
                real[name] = st
    # A real entry shadows a leftover whiteout of the same name.
    return _Listing(real, whiteouts - real.keys(), marker)


def _sort_key(name: str) -> bytes:
    return os.fsencode(name)  # byte order, like GNU tar --sort=name


def walk_upper(upper_dir: str | os.PathLike[str]) -> Iterator[UpperEntry]:
    """Every entry under upper_dir (not the root itself), depth first, sorted by name."""
    root = os.fspath(upper_dir)
    if not os.path.isdir(root):
        raise UsageError(root, "overlay upper is not a directory")
    seen_inodes: dict[tuple[int, int], str] = {}
    # An explicit stack, not recursion: directory depth is bounded only by PATH_MAX.
    stack: list[Iterator[_Item]] = [_walk_dir(root, "", _list_dir(root), seen_inodes)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        entry, children = item
        yield entry
        if children is not None:
            stack.append(children)


_Item = tuple[UpperEntry, "Iterator[_Item] | None"]


def _walk_dir(
    abs_dir: str, rel_dir: str, listing: _Listing, seen: dict[tuple[int, int], str]
) -> Iterator[_Item]:
    names = sorted(set(listing.real) | listing.whiteouts, key=_sort_key)
    for name in names:
        rel = f"{rel_dir}/{name}" if rel_dir else name
        st = listing.real.get(name)
        if st is None:
            yield UpperEntry(rel, "whiteout", 0, 0, 0, 0), None
            continue
        path = os.path.join(abs_dir, name)
        xattrs, opaque = _read_xattrs(path)
        common = _StatFields(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, mtime=int(st.st_mtime),
                             xattrs=tuple(sorted(xattrs.items())))
        if stat.S_ISDIR(st.st_mode):
            sub = _list_dir(path)
            entry = UpperEntry(rel, "dir", opaque=opaque or sub.has_opaque_marker, **common)
            yield entry, _walk_dir(path, rel, sub, seen)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                yield UpperEntry(rel, "hardlink", link=seen[key], **common), None
                continue
            if st.st_nlink > 1:
                seen[key] = rel
            yield UpperEntry(rel, "file", size=st.st_size, source=path, **common), None
        elif stat.S_ISLNK(st.st_mode):
            yield UpperEntry(rel, "symlink", link=os.readlink(path), **common), None
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "char" if stat.S_ISCHR(st.st_mode) else "block"
            yield UpperEntry(rel, kind, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **common), None
        elif stat.S_ISFIFO(st.st_mode):
            yield UpperEntry(rel, "fifo", **common), None
        else:
            log.warning("skipping %s: sockets cannot be stored in a layer", path)


# --- tar rendering --------------------------------------------------------------------


def _tarinfo(name: str, kind: bytes, entry: UpperEntry | None = None, *, mode: int = 0, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.uname = info.gname = ""  # numeric owners only
    if entry is not None:
        info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.gid, entry.mtime
        # typeshed types pax_headers as a read-only Mapping: build the dict, then assign it.
        info.pax_headers = {
            **info.pax_headers,
            **{f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape") for key, value in entry.xattrs},
        }
    else:  # synthetic entries (whiteouts, markers): fixed attributes, deterministic
        info.mode, info.uid, info.gid, info.mtime = mode, 0, 0, 0
    info.size = size
    return info


def _add_common(tf: tarfile.TarFile, entry: UpperEntry) -> bool:
    """Entries rendered the same way in both conventions; False if not handled."""
    if entry.kind == "file":
        info = _tarinfo(entry.path, tarfile.REGTYPE, entry, size=entry.size)
        assert entry.source is not None
        with open(entry.source, "rb", buffering=0) as src:
            tf.addfile(info, src)
    elif entry.kind == "hardlink":
        info = _tarinfo(entry.path, tarfile.LNKTYPE, entry)
        info.linkname = entry.link or ""
        tf.addfile(info)
    elif entry.kind == "symlink":
        info = _tarinfo(entry.path, tarfile.SYMTYPE, entry)
        info.linkname = entry.link or ""
        tf.addfile(info)
    elif entry.kind in ("char", "block"):
        info = _tarinfo(entry.path, tarfile.CHRTYPE if entry.kind == "char" else tarfile.BLKTYPE, entry)
        info.devmajor, info.devminor = entry.rdev
        tf.addfile(info)
    elif entry.kind == "fifo":
        tf.addfile(_tarinfo(entry.path, tarfile.FIFOTYPE, entry))
    else:
        return False
    return True


def _write_aufs(tf: tarfile.TarFile, upper_dir: str | os.PathLike[str]) -> None:
    for entry in walk_upper(upper_dir):
        if entry.kind == "dir":
            tf.addfile(_tarinfo(entry.path, tarfile.DIRTYPE, entry))
            if entry.opaque:
                tf.addfile(_tarinfo(f"{entry.path}/{OPAQUE_MARKER}", tarfile.REGTYPE, mode=0o600))
        elif entry.kind == "whiteout":
            parent, _, name = entry.path.rpartition("/")
            wh = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else f"{WHITEOUT_PREFIX}{name}"
            tf.addfile(_tarinfo(wh, tarfile.REGTYPE, mode=0o600))
        elif not _add_common(tf, entry):
            raise AssertionError(f"unhandled entry kind {entry.kind}")


def upper_to_tar(upper_dir: str | os.PathLike[str], fileobj: BinaryIO) -> tuple[str, int]:
    """Write `upper_dir` as an uncompressed OCI tar layer to fileobj.

    AUFS whiteouts (`.wh.NAME`, `DIR/.wh..wh..opq`, empty, mode 0600), overlay xattrs
    dropped, other xattrs as PAX SCHILY.xattr.*, hard links as LNKTYPE (whiteouts never),
    numeric owners, sorted order. Returns (diff_id 'sha256:<hex>', size in bytes).
    """
    sink = HashingWriter(fileobj)
    tf = open_tar(sink)
    _write_aufs(tf, upper_dir)
    tf.close()  # only on success: a failed walk must not end in a valid-looking archive
    sink.flush()
    return sink.digest, sink.count


# --- squashfs rendering ---------------------------------------------------------------


def _write_overlayfs(tf: tarfile.TarFile, upper_dir: str | os.PathLike[str]) -> None:
    """Overlayfs convention: char 0:0 whiteouts, trusted.overlay.opaque=y on opaque dirs."""
    root = os.fspath(upper_dir)
    st = os.lstat(root)
    root_xattrs, _ = _read_xattrs(root)
    root_entry = UpperEntry("./", "dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime),
                            xattrs=tuple(sorted(root_xattrs.items())))
    tf.addfile(_tarinfo("./", tarfile.DIRTYPE, root_entry))  # tar2sqfs: becomes the root inode
    for entry in walk_upper(root):
        if entry.kind == "dir":
            info = _tarinfo(entry.path, tarfile.DIRTYPE, entry)
            if entry.opaque:
                info.pax_headers = {**info.pax_headers, f"SCHILY.xattr.{OVERLAY_OPAQUE_XATTR}": "y"}
            tf.addfile(info)
        elif entry.kind == "whiteout":
            tf.addfile(_tarinfo(entry.path, tarfile.CHRTYPE, mode=0))
        elif not _add_common(tf, entry):
            raise AssertionError(f"unhandled entry kind {entry.kind}")


_LEVEL_COMPRESSORS: Final = ("gzip", "zstd", "xz", "lzma")


def upper_to_squashfs(
    upper_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    comp: str = "zstd",
    level: int | None = 3,
    keep_times: bool = False,
    io: FileIO = REAL_IO,
) -> tuple[str, int]:
    """Build a squashfs layer (overlayfs whiteout convention) from `upper_dir`.

    The normalized tree is streamed as tar into tar2sqfs: stale overlay xattrs never
    reach the image and no staging copy is needed. Times are fixed (0) unless
    `keep_times`, so the same upper always gives the same bytes. `out_path` must not
    exist; it is removed again on failure. Returns ('sha256:<hex>', size).
    """
    out = os.fspath(out_path)
    if os.path.lexists(out):
        raise UsageError(out, "squashfs output already exists")
    argv = ["tar2sqfs", "--quiet", "--no-skip", "--compressor", comp]
    if level is not None and comp in _LEVEL_COMPRESSORS:
        argv += ["--comp-extra", f"level={level}"]
    if not keep_times:
        argv.append("--no-keep-time")
    argv.append(out)
    try:
        io.external("tar2sqfs", [out], lambda: run_tar2sqfs(argv, out, lambda tf: _write_overlayfs(tf, upper_dir)))
    except BaseException:
        _remove(out, io)
        raise
    fd = os.open(out, os.O_RDONLY | os.O_CLOEXEC)
    try:
        io.fsync(fd)  # tar2sqfs wrote through its own descriptor
        size = os.fstat(fd).st_size
        digest = hash_range(fd, 0, size)
    finally:
        io.close(fd)
    log.info("squashed %s into %s (%d bytes, %s)", os.fspath(upper_dir), out, size, digest)
    return digest, size


def _remove(path: str, io: FileIO) -> None:
    try:
        io.unlink(path)
    except FileNotFoundError:
        pass
