"""Layer trees and whiteouts: OCI tar layers -> the overlayfs convention of squashfs layers.

OCI tar layers mark deletions AUFS-style: an entry `.wh.NAME` deletes NAME from the
layers below, `DIR/.wh..wh..opq` hides everything below in DIR. Squashfs layers in an
OCI-SIF use the overlayfs convention instead (spec §4): a char device 0:0 named NAME,
and the xattr `trusted.overlay.opaque=y` on the directory itself.

`TreeState` models the merged filesystem of the layers seen so far (path -> `Node`,
with inode identities so hard links stay hard links). `convert_layer` rewrites one
layer's tar stream for tar2sqfs and uses the state below it to:
* give directories the layer does not list (implicit parents, the root) the attributes
  they have below, so the stacked view keeps them (overlayfs shows the topmost
  layer's directory attributes);
* materialise hard links whose target lives in a lower layer: a squashfs image cannot
  link into another image, so the target's whole link group is copied into this layer
  and linked there, which is what applying the tar to the merged tree gives;
* keep the layer valid for overlayfs: a whited-out directory the layer fills again
  becomes an opaque directory (not a 0:0 device with entries below it); whiteouts and
  markers that hide nothing (absent below, or under a deleted / opaque directory) are
  dropped, because overlayfs lists stray 0:0 entries in directories it does not merge;
  a path given twice keeps its last entry (tar2sqfs refuses duplicates).
Image-spec semantics: a layer's whiteouts hit only lower content, then its entries land
in stream order (tests/importer checks this against an independent reference applier).
"""

from __future__ import annotations

import itertools
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from ..errors import OciFormatError

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
XATTR_PAX: Final = "SCHILY.xattr."
OPAQUE_XATTR: Final = "SCHILY.xattr.trusted.overlay.opaque"
# overlayfs bookkeeping xattrs from a foreign source would confuse the kernel: dropped.
_DROPPED_XATTRS: Final = ("SCHILY.xattr.trusted.overlay.", "SCHILY.xattr.user.overlay.")

_KINDS: Final = {
    tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo", tarfile.LNKTYPE: "hardlink",
}
_TYPES: Final = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
_inode_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class DataRef:
    """Where a regular file's bytes are: member `member` of staged layer tar `layer`."""

    layer: int
    member: tarfile.TarInfo


@dataclass(frozen=True, slots=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    inode: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()
    data: DataRef | None = None


@dataclass(frozen=True, slots=True)
class LayerScan:
    """What one layer declares: its entries, deletions and opaque directories."""

    members: tuple[tarfile.TarInfo, ...]
    defined: frozenset[str]
    whiteouts: frozenset[str]
    opaque: frozenset[str]


def normalize(name: str, where: str = "") -> str:
    """Tar member name -> path relative to the root ('' is the root); refuses '..'."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OciFormatError(where or None, f"layer entry {name!r} escapes the root")
    return "/".join(parts)


def is_overlay_whiteout(member: tarfile.TarInfo) -> bool:
    return member.type == tarfile.CHRTYPE and member.devmajor == 0 and member.devminor == 0


def scan_layer(members: Iterable[tarfile.TarInfo], *, convention: str = "aufs", where: str = "") -> LayerScan:
    """Classify a layer's entries. convention 'aufs' (tar layers) or 'overlay' (squashfs)."""
    items = tuple(members)
    defined: set[str] = set()
    whiteouts: set[str] = set()
    opaque: set[str] = set()
    for member in items:
        path = normalize(member.name, where)
        parent, base = posixpath.split(path)
        if convention == "aufs" and base == OPAQUE_MARKER:
            opaque.add(parent)
        elif convention == "aufs" and base.startswith(WHITEOUT_PREFIX):
            whiteouts.add(posixpath.join(parent, base[len(WHITEOUT_PREFIX):]))
        elif convention == "overlay" and is_overlay_whiteout(member):
            whiteouts.add(path)
        else:
            defined.add(path)
            if convention == "overlay" and member.isdir() and member.pax_headers.get(OPAQUE_XATTR) == "y":
                opaque.add(path)
    return LayerScan(items, frozenset(defined), frozenset(whiteouts), frozenset(opaque))


def is_marker(member: tarfile.TarInfo, convention: str) -> bool:
    base = posixpath.basename(normalize(member.name))
    if convention == "aufs":
        return base.startswith(WHITEOUT_PREFIX)
    return is_overlay_whiteout(member)


def kept_xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in member.pax_headers.items()
                        if k.startswith(XATTR_PAX) and not k.startswith(_DROPPED_XATTRS)))


def default_dir() -> Node:
    """What an implicitly created directory looks like (tar2sqfs --defaults as well)."""
    return Node("dir", 0o755, 0, 0, 0, next(_inode_ids))


@dataclass(slots=True)
class TreeState:
    """The merged tree of the layers applied so far, with OCI whiteout rules."""

    nodes: dict[str, Node] = field(default_factory=lambda: {"": default_dir()})

    def delete(self, path: str, *, keep_self: bool = False) -> None:
        node = self.nodes.get(path)
        if node is not None and node.kind == "dir":  # only directories need the subtree scan
            prefix = path + "/" if path else ""
            for key in [k for k in self.nodes if k.startswith(prefix) and k]:
                del self.nodes[key]
        if not keep_self and path:
            self.nodes.pop(path, None)

    def link_groups(self) -> dict[int, list[str]]:
        """inode -> sorted paths of every non-directory (one pass; hard links share an inode)."""
        groups: dict[int, list[str]] = {}
        for path, node in self.nodes.items():
            if node.kind != "dir":
                groups.setdefault(node.inode, []).append(path)
        for paths in groups.values():
            paths.sort()
        return groups

    def apply(self, scan: LayerScan, layer: int, *, convention: str = "aufs", where: str = "") -> None:
        """Apply one layer: its deletions hit only lower content, then its entries land.
        A hard link may name a lower file this layer also deletes (stream order: the link
        came first), so links resolve against the tree as it was before the deletions too."""
        before = self.nodes.copy() if any(m.type == tarfile.LNKTYPE for m in scan.members) else self.nodes
        for path in scan.whiteouts:
            self.delete(path)
        for path in scan.opaque:
            self.delete(path, keep_self=True)
        for member in scan.members:
            if is_marker(member, convention):
                continue
            path = normalize(member.name, where)
            self._ensure_parents(path, where)
            kind = _KINDS.get(member.type)
            if kind is None:
                raise OciFormatError(where or None, f"unsupported tar entry type {member.type!r} for {member.name!r}")
            if kind == "hardlink":
                target = normalize(member.linkname, where)
                node = self.nodes.get(target) or before.get(target)
                if node is None or node.kind == "dir":
                    raise OciFormatError(where or None, f"hard link {member.name!r} -> {member.linkname!r}: no such file")
                self.nodes[path] = node
                continue
            node = node_from_member(member, layer)
            old = self.nodes.get(path)
            if old is not None and old.kind == "dir" and kind != "dir":
                self.delete(path)
            self.nodes[path] = node

    def _ensure_parents(self, path: str, where: str) -> None:
        parts = path.split("/")[:-1] if path else []
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            node = self.nodes.get(parent)
            if node is None:
                self.nodes[parent] = default_dir()
            elif node.kind != "dir":
                raise OciFormatError(where or None, f"layer entry {path!r} lies under non-directory {parent!r}")


def node_from_member(member: tarfile.TarInfo, layer: int) -> Node:
    kind = _KINDS[member.type]
    xattrs = tuple(kv for kv in kept_xattrs(member) if kv[0] != OPAQUE_XATTR)
    return Node(
        kind, member.mode & 0o7777, member.uid, member.gid, int(member.mtime), next(_inode_ids),
        linkname=member.linkname if kind == "symlink" else "",
        devmajor=member.devmajor, devminor=member.devminor, xattrs=xattrs,
        data=DataRef(layer, member) if kind == "file" else None,
    )


def member_for(path: str, node: Node, *, opaque: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path + "/" if node.kind == "dir" and path else (path or "./"))
    info.type = _TYPES[node.kind]
    info.mode, info.uid, info.gid, info.mtime = node.mode, node.uid, node.gid, node.mtime
    info.uname = info.gname = ""
    info.linkname = node.linkname
    info.devmajor, info.devminor = node.devmajor, node.devminor
    info.size = node.data.member.size if node.data is not None else 0
    headers = dict(node.xattrs)
    if opaque:
        headers[OPAQUE_XATTR] = "y"
    info.pax_headers = headers
    return info


class _Emitter:
    """Writes entries once each, synthesising missing directories from the lower tree."""

    def __init__(self, out: tarfile.TarFile, lower: TreeState, scan: LayerScan,
                 readers: dict[int, tarfile.TarFile], recreated: frozenset[str]) -> None:
        self.out, self.lower, self.scan, self.readers = out, lower, scan, readers
        self.recreated = recreated
        self.opaque = scan.opaque | recreated
        self.done: set[str] = set()
        self.entries = 0
        self._groups: dict[int, list[str]] | None = None  # built on the first lower hard link
        self._copied: dict[int, str] = {}  # lower inode -> its copy in this layer

    def dirs_down_to(self, path: str, *, inclusive: bool) -> None:
        parts = path.split("/") if path else []
        chain = [""] + ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if not inclusive:
            chain = chain[:-1]
        for directory in chain:
            if directory in self.done or directory in self.scan.defined:
                continue
            below = None if self._hidden(directory) else self.lower.nodes.get(directory)
            node = below if below is not None and below.kind == "dir" else default_dir()
            self.write(directory, member_for(directory, node, opaque=directory in self.opaque))

    def write(self, path: str, info: tarfile.TarInfo, data: tarfile.TarFile | None = None,
              source: tarfile.TarInfo | None = None) -> None:
        fileobj = data.extractfile(source) if data is not None and source is not None else None
        self.out.addfile(info, fileobj)
        self.done.add(path)
        self.entries += 1

    def copy_lower_group(self, target: str, link: str, info: tarfile.TarInfo) -> None:
        """Hard link `link` to the lower file `target`. A squashfs image cannot link into
        another one, so the target's link group (names this layer neither redefines nor
        hides) is copied into this layer and linked there; with no such name left, `link`
        itself becomes the copy."""
        if self._groups is None:
            self._groups = self.lower.link_groups()
        node = self.lower.nodes[target]
        if node.inode in self._copied:  # an earlier link of this layer already copied it
            info.linkname = self._copied[node.inode]
            self.write(link, info)
            return
        group = [p for p in self._groups[node.inode] if p not in self.scan.defined and not self._hidden(p)]
        holder = group[0] if group else link
        self._copied[node.inode] = holder
        for path in group or [link]:
            if path in self.done:
                continue
            self.dirs_down_to(path, inclusive=False)
            member = member_for(path, node)
            if path == holder and node.data is not None:
                self.write(path, member, self.readers[node.data.layer], node.data.member)
            elif path == holder:
                self.write(path, member)
            else:
                member.type, member.linkname, member.size = tarfile.LNKTYPE, holder, 0
                self.write(path, member)
        if link != holder:
            info.linkname = holder
            self.write(link, info)

    def covered(self, path: str) -> bool:
        """A proper ancestor of `path` is deleted or opaque in this layer: nothing below
        `path` shows through from the lower layers any more."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.scan.whiteouts or prefix in self.opaque:
                return True
        return bool(path) and "" in self.opaque

    def _hidden(self, path: str) -> bool:
        """Deleted or hidden by this layer's own whiteouts / opaque dirs."""
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix in self.scan.whiteouts or (i < len(parts) and prefix in self.scan.opaque):
                return True
        return "" in self.scan.opaque


def convert_layer(scan: LayerScan, source: tarfile.TarFile, lower: TreeState,
                  readers: dict[int, tarfile.TarFile], out: tarfile.TarFile, *, where: str = "") -> int:
    """Write `scan`'s layer (AUFS whiteouts) to `out` in the overlayfs convention.

    `lower` is the merged tree below this layer; `readers` the staged tars of lower
    layers (for hard-link targets that live there). Returns the number of entries written.
    """
    emit = _Emitter(out, lower, scan, readers, _recreated_dirs(scan, where))
    emit.dirs_down_to("", inclusive=True)  # the root first, with the attributes from below
    # tar2sqfs refuses a path twice; extraction semantics = the last entry wins.
    last = {normalize(m.name, where): i for i, m in enumerate(scan.members)}
    for position, member in enumerate(scan.members):
        path = normalize(member.name, where)
        parent, base = posixpath.split(path)
        if base == OPAQUE_MARKER:
            below = lower.nodes.get(parent)
            visible = below is not None and below.kind == "dir" and not emit.covered(parent)
            deleted = parent in scan.whiteouts and parent not in emit.recreated  # its whiteout wins
            if (parent in scan.defined or visible) and not deleted:
                emit.dirs_down_to(parent, inclusive=True)
            continue  # an opaque marker where nothing shows through hides nothing
        if base.startswith(WHITEOUT_PREFIX):
            target = posixpath.join(parent, base[len(WHITEOUT_PREFIX):])
            if (target in scan.defined or target in emit.done or target not in lower.nodes
                    or target in emit.recreated or emit.covered(target)):
                # Recreated in this very layer (an opaque dir if needed), nothing to hide,
                # or already hidden; overlayfs shows stray 0:0 entries in dirs it does not merge.
                continue
            emit.dirs_down_to(target, inclusive=False)
            info = tarfile.TarInfo(target)
            info.type, info.mode, info.mtime, info.uname, info.gname = tarfile.CHRTYPE, 0, int(member.mtime), "", ""
            emit.write(target, info)
            continue
        if last[path] != position:
            continue
        emit.dirs_down_to(path, inclusive=False)
        info = _rewritten(member, path, opaque=path in emit.opaque, where=where)
        if member.type == tarfile.LNKTYPE:
            target = normalize(member.linkname, where)
            if target == path:
                continue  # a link to itself changes nothing
            if target in emit.done:
                info.linkname = target
                emit.write(path, info)
            elif target in lower.nodes and lower.nodes[target].kind != "dir":
                emit.copy_lower_group(target, path, info)
            else:
                raise OciFormatError(where or None, f"hard link {member.name!r} -> {member.linkname!r}: no such file")
        elif member.isreg():
            emit.write(path, info, source, member)
        else:
            emit.write(path, info)
    return emit.entries


def _recreated_dirs(scan: LayerScan, where: str) -> frozenset[str]:
    """Whited-out paths this layer fills again as directories: the whiteout deletes the
    lower directory first, so the new one must hide everything below (opaque), not be a
    0:0 char device that the layer's own entries would sit under."""
    parents: set[str] = set()
    dirs: set[str] = set()
    for member in scan.members:
        if is_marker(member, "aufs"):
            continue
        path = normalize(member.name, where)
        if member.isdir():
            dirs.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            parents.add(path)
    return frozenset(t for t in scan.whiteouts if t in parents or t in dirs)


def _rewritten(member: tarfile.TarInfo, path: str, *, opaque: bool, where: str) -> tarfile.TarInfo:
    if member.type not in _KINDS:
        raise OciFormatError(where or None, f"unsupported tar entry type {member.type!r} for {member.name!r}")
    info = tarfile.TarInfo(path + "/" if member.isdir() and path else (path or "./"))
    info.type = tarfile.REGTYPE if member.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else member.type
    info.mode, info.uid, info.gid, info.mtime = member.mode & 0o7777, member.uid, member.gid, int(member.mtime)
    info.uname = info.gname = ""
    info.linkname = member.linkname
    info.devmajor, info.devminor = member.devmajor, member.devminor
    info.size = member.size if member.isreg() else 0
    headers = dict(kept_xattrs(member))
    if opaque:
        headers[OPAQUE_XATTR] = "y"
    info.pax_headers = headers
    return info
