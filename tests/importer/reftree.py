"""Test support for the importer: an independent reference applier for OCI layers, a
snapshot of a real directory tree, small OCI layout builders, and kernel mounts of
OCI-SIF layers (loop devices at SIF offsets + overlayfs).

The reference applier is deliberately written apart from sifoverlay.ocisif.whiteout: a
tree of Python objects where a hard link is the same object under two names, layers
applied with the image-spec rules (a layer's whiteouts hide lower content only, then its
entries land; a hard link joins its target's inode, wherever the target came from).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Snapshot = tuple[dict[str, tuple[Any, ...]], list[list[str]]]


class RefNode:
    """One inode of the reference tree; directories hold `children`."""

    def __init__(self, kind: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.kind, self.mode, self.uid, self.gid = kind, mode, uid, gid
        self.link = ""
        self.digest = ""
        self.xattrs: dict[str, bytes] = {}
        self.rdev = (0, 0)
        self.children: dict[str, RefNode] = {}


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
    return out


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


class ReferenceTree:
    def __init__(self) -> None:
        self.root = RefNode("dir")

    def _dir(self, parts: list[str], create: bool) -> RefNode | None:
        node = self.root
        for part in parts:
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = node.children[part] = RefNode("dir")
            if child.kind != "dir":
                return None
            node = child
        return node

    def apply_tar(self, tf: tarfile.TarFile, *, overlay_convention: bool = False) -> None:
        members = tf.getmembers()
        landing = []
        for m in members:  # pass 1: deletions of lower content
            parts = _parts(m.name)
            base = parts[-1] if parts else ""
            if overlay_convention:
                if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                    parent = self._dir(parts[:-1], False)
                    if parent is not None:
                        parent.children.pop(base, None)
                    continue
                if m.isdir() and _xattrs(m).get("trusted.overlay.opaque") == b"y":
                    target = self._dir(parts, False)
                    if target is not None:
                        target.children.clear()
                landing.append(m)
                continue
            if base == ".wh..wh..opq":
                target = self._dir(parts[:-1], False)
                if target is not None:
                    target.children.clear()
            elif base.startswith(".wh."):
                parent = self._dir(parts[:-1], False)
                if parent is not None:
                    parent.children.pop(base[4:], None)
            else:
                landing.append(m)
        for m in landing:  # pass 2: this layer's entries
            parts = _parts(m.name)
            xattrs = {k: v for k, v in _xattrs(m).items() if not k.startswith("trusted.overlay.")}
            if not parts:
                self.root.mode, self.root.uid, self.root.gid, self.root.xattrs = m.mode & 0o7777, m.uid, m.gid, xattrs
                continue
            parent = self._dir(parts[:-1], True)
            assert parent is not None, m.name
            name = parts[-1]
            if m.islnk():
                target_parts = _parts(m.linkname)
                holder = self._dir(target_parts[:-1], False)
                parent.children[name] = holder.children[target_parts[-1]]  # type: ignore[union-attr]
                continue
            existing = parent.children.get(name)
            if m.isdir() and existing is not None and existing.kind == "dir":
                node = existing
            else:
                node = RefNode("dir" if m.isdir() else _kind(m))
                parent.children[name] = node
            node.mode, node.uid, node.gid, node.xattrs = m.mode & 0o7777, m.uid, m.gid, xattrs
            if m.issym():
                node.link = m.linkname
            elif m.isreg():
                data = tf.extractfile(m)
                node.digest = hashlib.sha256(data.read() if data else b"").hexdigest()
            elif m.ischr() or m.isblk():
                node.rdev = (m.devmajor, m.devminor)

    def snapshot(self) -> Snapshot:
        entries: dict[str, tuple[Any, ...]] = {}
        groups: dict[int, list[str]] = {}

        def visit(node: RefNode, path: str) -> None:
            entries[path] = _record(node.kind, node.mode, node.uid, node.gid, node.link, node.digest, node.xattrs, node.rdev)
            if node.kind != "dir":
                groups.setdefault(id(node), []).append(path)
            for name, child in node.children.items():
                visit(child, f"{path}/{name}" if path else name)

        visit(self.root, "")
        return entries, _groups(groups.values())


def _kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return "file"
    if m.issym():
        return "symlink"
    if m.ischr():
        return "char"
    if m.isblk():
        return "block"
    if m.isfifo():
        return "fifo"
    raise AssertionError(f"unexpected tar entry {m.name!r} type {m.type!r}")


def _record(kind: str, mode: int, uid: int, gid: int, link: str, digest: str, xattrs: dict[str, bytes],
            rdev: tuple[int, int]) -> tuple[Any, ...]:
    if kind == "symlink":
        mode = 0o777  # Linux symlinks have no permissions of their own
    return (kind, oct(mode), uid, gid, link, digest, tuple(sorted(xattrs.items())), rdev if kind in ("char", "block") else None)


def _groups(values: Any) -> list[list[str]]:
    return sorted(sorted(paths) for paths in values if len(paths) > 1)


def snapshot_dir(root: str) -> Snapshot:
    """The same record for a real (mounted) tree; hard links = same (st_dev, st_ino)."""
    entries: dict[str, tuple[Any, ...]] = {}
    groups: dict[tuple[int, int], list[str]] = {}

    def visit(full: str, path: str) -> None:
        st = os.lstat(full)
        fmt = stat.S_IFMT(st.st_mode)
        kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
                stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}[fmt]
        link = os.readlink(full) if kind == "symlink" else ""
        digest = ""
        if kind == "file":
            with open(full, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError as exc:  # a squashfs without an xattr table says "not supported"
            if exc.errno != errno.EOPNOTSUPP:
                raise
            names = []
        xattrs = {k: os.getxattr(full, k, follow_symlinks=False) for k in names}
        entries[path] = _record(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, link, digest, xattrs,
                                (os.major(st.st_rdev), os.minor(st.st_rdev)))
        if kind != "dir":
            groups.setdefault((st.st_dev, st.st_ino), []).append(path)
        else:
            for name in sorted(os.listdir(full)):
                visit(os.path.join(full, name), f"{path}/{name}" if path else name)

    visit(root, "")
    return entries, _groups(groups.values())


# -- reading a layout the simple way (independent of sifoverlay.ocisif.layout_dir) -----------------
def layout_layers(layout: Path, *, arch: str = "amd64") -> list[tuple[str, Path]]:
    """(mediaType, blob path) of the image a plain reading of the layout gives: the first
    non-cosign top-level entry, a manifest list resolved to `arch`."""
    def blob(digest: str) -> Path:
        return layout / "blobs" / "sha256" / digest.split(":", 1)[1]

    index = json.loads((layout / "index.json").read_bytes())
    entry = next(e for e in index["manifests"]
                 if not e.get("annotations", {}).get("org.opencontainers.image.ref.name", "").startswith("_cosign"))
    doc = json.loads(blob(entry["digest"]).read_bytes())
    if "manifests" in doc:
        entry = next(e for e in doc["manifests"] if e["platform"]["architecture"] == arch)
        doc = json.loads(blob(entry["digest"]).read_bytes())
    return [(layer["mediaType"], blob(layer["digest"])) for layer in doc["layers"]]


def reference_snapshot(layers: list[tuple[str, Path]]) -> Snapshot:
    tree = ReferenceTree()
    for media_type, path in layers:
        if media_type.endswith("squashfs"):
            raw = subprocess.run(["sqfs2tar", "--root-becomes", ".", str(path)], check=True, capture_output=True).stdout
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
                tree.apply_tar(tf, overlay_convention=True)
        else:
            with tarfile.open(path, mode="r:*") as tf:
                tree.apply_tar(tf)
    return tree.snapshot()


# -- building small layouts ---------------------------------------------------------------------
def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: str = "file", *, mode: int = 0o644, uid: int = 0, gid: int = 0, link: str = "",
          xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.mode, info.uid, info.gid, info.linkname, info.mtime = mode, uid, gid, link, 1700000000
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info


def write_layout(root: Path, images: list[dict[str, Any]]) -> Path:
    """A layout with one index entry per image dict: {layers: [(mediaType, bytes)],
    tag: str|None, platform: dict|None, config: dict (extra keys)}."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(raw: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return {"mediaType": media_type, "size": len(raw), "digest": f"sha256:{digest}"}

    entries = []
    for image in images:
        layers, diff_ids = [], []
        for media_type, raw in image["layers"]:
            layers.append(put(raw, media_type))
            plain = raw
            if raw[:2] == b"\x1f\x8b":
                import gzip
                import zlib

                try:
                    plain = gzip.decompress(raw)
                except (OSError, EOFError, zlib.error):  # deliberately broken layers
                    plain = raw
            diff_ids.append("sha256:" + hashlib.sha256(plain).hexdigest())
        config = {"architecture": "amd64", "os": "linux", **image.get("config", {}),
                  "rootfs": {"type": "layers", "diff_ids": diff_ids},
                  "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
        config_desc = put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": layers}
        desc = put(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
        if image.get("tag"):
            desc["annotations"] = {"org.opencontainers.image.ref.name": image["tag"]}
        if image.get("platform"):
            desc["platform"] = image["platform"]
        entries.append(desc)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    (root / "index.json").write_text(json.dumps(index))
    return root


# -- kernel mounts ------------------------------------------------------------------------------
def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


@contextmanager
def mounted_stack(image: str | os.PathLike[str], ranges: list[tuple[int, int]]) -> Iterator[str]:
    """Loop-attach each (offset, size) read-only, mount it as squashfs, stack the mounts
    with kernel overlayfs (first range = bottom layer); yield the merged directory.
    Unmounts and detaches everything on the way out, whatever happened."""
    work = tempfile.mkdtemp(prefix="h4m")  # short paths: 50 lowerdirs must fit one page
    loops: list[str] = []
    mounts: list[str] = []
    try:
        for i, (offset, size) in enumerate(ranges):
            device = _run("losetup", "-r", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), os.fspath(image))
            loops.append(device)
            point = os.path.join(work, str(i))
            os.mkdir(point)
            _run("mount", "-t", "squashfs", "-o", "ro", device, point)
            mounts.append(point)
        empty = os.path.join(work, "e")  # overlayfs wants two lowers when there is no upper
        merged = os.path.join(work, "m")
        os.mkdir(empty)
        os.mkdir(merged)
        lower = ":".join([*reversed(mounts), empty])
        _run("mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", merged)
        mounts.append(merged)
        yield merged
    finally:
        problems = []
        for point in reversed(mounts):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                problems.append(point)
        for device in loops:
            if subprocess.run(["losetup", "-d", device], capture_output=True).returncode != 0:
                problems.append(device)
        for name in sorted(os.listdir(work), reverse=True) if os.path.isdir(work) else []:
            try:
                os.rmdir(os.path.join(work, name))
            except OSError:
                problems.append(name)
        try:
            os.rmdir(work)
        except OSError:
            pass
        assert not problems, f"cleanup failed for {problems}"
