"""`import_image`: build a runnable, deterministic OCI-SIF from an OCI image layout or a
native SIF.

* OCI layout (`DIR` or `DIR:TAG`, see layout_dir): every blob is digest-checked; tar and
  tar+gzip layers are decompressed into a private staging dir (diff_ids checked too),
  rewritten with overlayfs whiteouts (whiteout.convert_layer) and packed by tar2sqfs
  (squashfs); squashfs layers pass through byte for byte. `squash=True` applies all
  layers (OCI whiteout rules) and packs the merged tree as one layer.
* native SIF: its primary squashfs system partition becomes the single layer, raw bytes
  as they are; a config is synthesised (architecture from the partition / header).

The config keeps every field of the source except `rootfs.diff_ids` (= the squashfs
digests) and, with squash, `history` (one entry). The manifest is an OCI manifest with an
OCI config descriptor; the root index has one entry. The file is written by
build.write_ocisif (temp file + rename through the io seam): on any error nothing is left
at OUT. Same source in -> byte-identical file out.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, Final

from ..errors import ExternalToolError, OciFormatError, SifFormatError, UsageError
from ..fsio import REAL_IO, FileIO
from ..sif.constants import DataType, FsType, arch_name
from ..sif.load import SifFile
from . import jsonedit
from . import mediatypes as mt
from .build import write_ocisif
from .layout_dir import BlobRef, OciLayout, Platform, SourceImage, check_digest, split_source
from .squashfs import SquashfsFile, build_from_tar, hash_file, looks_like_squashfs, squashfs_to_tar
from .whiteout import LayerScan, TreeState, convert_layer, member_for, scan_layer

log = logging.getLogger(__name__)

TAR_TYPES: Final = frozenset({mt.OCI_LAYER_TAR, mt.OCI_LAYER_TAR_GZIP, mt.DOCKER_LAYER_TAR_GZIP,
                              "application/vnd.docker.image.rootfs.diff.tar"})
DEFAULT_PATH_ENV: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHUNK: Final = 4 << 20
TAR_BLOCK: Final = 512


@dataclass(frozen=True, slots=True)
class ImportedLayer:
    digest: str
    size: int
    source_digest: str
    source_media_type: str
    entries: int | None  # tar entries written into the squashfs (None: passed through)


@dataclass(frozen=True, slots=True)
class ImportResult:
    source: str
    output: str
    kind: str  # "oci-layout" | "native-sif"
    platform: str | None
    squashed: bool
    manifest_digest: str
    config_digest: str
    layers: tuple[ImportedLayer, ...]
    file_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "output": self.output, "kind": self.kind, "platform": self.platform,
            "squashed": self.squashed, "manifest": self.manifest_digest, "config": self.config_digest,
            "size": self.file_size,
            "layers": [{"mediaType": mt.SQUASHFS_LAYER, "digest": l.digest, "size": l.size,
                        "source_digest": l.source_digest, "source_media_type": l.source_media_type,
                        "entries": l.entries} for l in self.layers],
        }


def import_image(source: str | os.PathLike[str], out: str | os.PathLike[str], *, platform: str | None = None,
                 squash: bool = False, io: FileIO = REAL_IO) -> ImportResult:
    """Import `source` (layout DIR, DIR:TAG, or native SIF file) into the OCI-SIF `out`."""
    src, dest = os.fspath(source), os.fspath(out)
    wanted = Platform.parse(platform) if platform else None
    out_dir = os.path.dirname(os.path.abspath(dest))
    if os.path.isdir(dest):
        raise UsageError(dest, "output is a directory")
    if not os.path.isdir(out_dir):
        raise UsageError(dest, "output directory does not exist")
    sweep_dead_imports(dest, io=io)
    staging = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_host_tag()}-{os.getpid()}-", dir=out_dir)  # removed below
    try:
        if os.path.isfile(src):
            return _import_native(src, dest, staging, io=io)
        directory, tag = split_source(src)
        if os.path.exists(src) and not os.path.isdir(src):
            raise UsageError(src, "not a directory or regular file")
        image = OciLayout(directory).select(tag, wanted)
        return _import_layout(src, image, dest, staging, squash=squash, io=io)
    except ExternalToolError as exc:  # name the source, not our scratch file
        raise ExternalToolError(src, exc.problem, **exc.data) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # io-seam: exempt (this import's private scratch dir, never an image)


SCRATCH_PREFIX: Final = ".sifoverlay-import-"


def _host_tag() -> str:
    return "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"


def _pid_gone(text: str) -> bool:
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_dead_imports(out: str | os.PathLike[str], *, io: FileIO = REAL_IO) -> list[str]:
    """Remove what a SIGKILLed import into the directory of `out` left there (a real kill
    runs no `finally:`): staging dirs ``.sifoverlay-import-<host>-<pid>-*`` of this host
    and the half-written ``.<out name>.sifnew.<pid>`` of `sif.create.write_new`, when that
    process is gone. Run by every import before it stages anything."""
    dest = os.path.abspath(os.fspath(out))
    directory, base = os.path.split(dest)
    mine = f"{SCRATCH_PREFIX}{_host_tag()}-"
    partial = f".{base}.sifnew."
    removed: list[str] = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(mine) and _pid_gone(name[len(mine):].split("-", 1)[0]) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)  # io-seam: exempt (a dead import's private scratch dir, never an image)
            removed.append(path)
        elif name.startswith(partial) and _pid_gone(name[len(partial):]):
            try:
                io.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


class _Staged:
    """A new private scratch file written through the io seam (sequential writes)."""

    def __init__(self, path: str, io: FileIO) -> None:
        self.io = io
        self.fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.position = 0

    def write(self, data: bytes) -> None:
        if data:
            self.io.pwrite(self.fd, data, self.position)
            self.position += len(data)

    def __enter__(self) -> _Staged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.io.close(self.fd)


# -- OCI layouts -----------------------------------------------------------------------------
def _import_layout(src: str, image: SourceImage, dest: str, staging: str, *, squash: bool, io: FileIO) -> ImportResult:
    layout = image.layout
    diff_ids = image.config.get("rootfs", {}).get("diff_ids") if isinstance(image.config.get("rootfs"), dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layers):
        raise OciFormatError(layout.path, f"config {image.config_ref.digest} has {len(diff_ids or [])} diff_ids "
                                          f"for {len(image.layers)} layers")
    tree = TreeState()
    readers: dict[int, tarfile.TarFile] = {}
    built: list[tuple[SquashfsFile, ImportedLayer]] = []
    needs_tree = [squash or any(l.media_type != mt.SQUASHFS_LAYER for l in image.layers[i + 1:])
                  for i in range(len(image.layers))]
    try:
        for index, ref in enumerate(image.layers):
            where = f"{layout.path} layer {index} ({ref.digest})"
            if ref.media_type == mt.SQUASHFS_LAYER:
                layer_file = _stage_verified(layout, ref, os.path.join(staging, f"{index}.sqfs"), io)
                if needs_tree[index]:
                    tar_path = os.path.join(staging, f"{index}.tar")
                    squashfs_to_tar(layer_file.path, tar_path, io=io)
                    readers[index] = tarfile.open(tar_path, "r:")  # noqa: SIM115 - closed below
                    tree.apply(scan_layer(readers[index].getmembers(), convention="overlay", where=where),
                               index, convention="overlay", where=where)
                built.append((layer_file, ImportedLayer(ref.digest, ref.size, ref.digest, ref.media_type, None)))
                continue
            if ref.media_type not in TAR_TYPES:
                raise OciFormatError(layout.path, f"layer {index} has unsupported media type {ref.media_type}")
            tar_path, tar_size = _stage_tar(layout, ref, diff_ids[index], os.path.join(staging, f"{index}.tar"), io)
            try:
                readers[index] = reader = tarfile.open(tar_path, "r:")  # noqa: SIM115 - closed below
                members = reader.getmembers()
                _check_complete(members, tar_size)
                scan = scan_layer(members, where=where)
            except tarfile.TarError as exc:
                raise OciFormatError(layout.path, f"layer {index} ({ref.digest}) is not a valid tar: {exc}") from exc
            if not squash:
                counted: list[int] = []

                def write_layer(out: tarfile.TarFile, s: LayerScan = scan, r: tarfile.TarFile = reader) -> None:
                    counted.append(convert_layer(s, r, tree, readers, out, where=where))

                layer_file = build_from_tar(os.path.join(staging, f"{index}.sqfs"), write_layer)
                built.append((layer_file, ImportedLayer(layer_file.digest, layer_file.size, ref.digest,
                                                        ref.media_type, counted[0])))
            tree.apply(scan, index, where=where)
        if squash:
            counted = []
            layer_file = build_from_tar(os.path.join(staging, "squashed.sqfs"),
                                        lambda out: counted.append(write_flattened(tree, readers, out)))
            source_digest = image.manifest_ref.digest
            built = [(layer_file, ImportedLayer(layer_file.digest, layer_file.size, source_digest,
                                                image.manifest_ref.media_type, counted[0]))]
    finally:
        for reader in readers.values():
            reader.close()
    config = _rewrite_config(image.config, [l.digest for _, l in built], squash=squash,
                             squashed_from=image.manifest_ref.digest)
    annotations = image.manifest.get("annotations") if isinstance(image.manifest.get("annotations"), dict) else None
    return _write(src, dest, "oci-layout", _platform_name(image), squash, built, config, annotations, io=io)


def _platform_name(image: SourceImage) -> str | None:
    """The index entry's platform, else the config's os/architecture (None if unstated)."""
    if image.platform is not None and str(image.platform):
        return str(image.platform)
    config = image.config
    named = Platform(str(config.get("os") or ""), str(config.get("architecture") or ""), str(config.get("variant") or ""))
    return str(named) if named.os and named.architecture else None


def write_flattened(state: TreeState, readers: dict[int, tarfile.TarFile], out: tarfile.TarFile) -> int:
    """The merged tree as one tar: no whiteouts, hard-link groups kept, sorted paths."""
    holders: dict[int, str] = {}
    count = 0
    for path in sorted(state.nodes, key=lambda p: p.split("/") if p else []):
        node = state.nodes[path]
        info = member_for(path, node)
        holder = holders.get(node.inode) if node.kind != "dir" else None
        if holder is not None:
            info.type, info.linkname, info.size = tarfile.LNKTYPE, holder, 0
            out.addfile(info)
        else:
            holders[node.inode] = path
            data = readers[node.data.layer].extractfile(node.data.member) if node.data is not None else None
            out.addfile(info, data)
        count += 1
    return count


def _rewrite_config(config: dict[str, Any], digests: list[str], *, squash: bool, squashed_from: str) -> dict[str, Any]:
    new = copy.deepcopy(config)
    rootfs: dict[str, Any] = new["rootfs"] if isinstance(new.get("rootfs"), dict) else {}
    new["rootfs"] = dict(rootfs, type="layers", diff_ids=list(digests))
    if squash:
        entry: dict[str, Any] = {"created_by": "sifoverlay import --squash", "comment": f"squashed from {squashed_from}"}
        if isinstance(config.get("created"), str):
            entry = {"created": config["created"], **entry}
        new["history"] = [entry]
    return new


def _stage_verified(layout: OciLayout, ref: BlobRef, dest: str, io: FileIO) -> SquashfsFile:
    """Copy a squashfs layer blob into staging, checking digest and magic."""
    hasher, size = hashlib.sha256(), 0
    with layout.open_blob(ref.digest) as src, _Staged(dest, io) as out:
        head = src.read(4)
        if not looks_like_squashfs(head):
            raise OciFormatError(layout.path, f"layer {ref.digest} is typed squashfs but is not a squashfs image")
        hasher.update(head)
        out.write(head)
        size = len(head)
        while chunk := src.read(_CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
    check_digest(layout.path, ref, hasher.hexdigest(), size)
    return SquashfsFile(dest, ref.digest, size)


def _check_complete(members: list[tarfile.TarInfo], size: int) -> None:
    """Every member's data lies inside the layer as it was stored (before `_stage_tar`'s
    padding): a tar may end without the padding of its last member and without the two
    zero end-of-archive blocks (`umoci insert` writes such layers; GNU tar and Go's
    archive/tar read them), but not in the middle of a member's data."""
    for member in members:
        if member.isreg() and not member.issparse() and member.offset_data + member.size > size:
            raise tarfile.ReadError(f"truncated in the data of {member.name!r}")


def _stage_tar(layout: OciLayout, ref: BlobRef, diff_id: object, dest: str, io: FileIO) -> tuple[str, int]:
    """Decompress a (gzip) tar layer into staging; check the blob digest and the diff_id.
    Returns the staged path and the tar's own length; the staged file is padded with
    zeros to whole 512-byte tar blocks (Python's tarfile insists on them, see
    `_check_complete`)."""
    blob_hash, tar_hash, blob_size = hashlib.sha256(), hashlib.sha256(), 0
    with layout.open_blob(ref.digest) as src, _Staged(dest, io) as out:
        gzipped = src.read(2) == b"\x1f\x8b"
        src.seek(0)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
        try:
            while chunk := src.read(_CHUNK):
                blob_hash.update(chunk)
                blob_size += len(chunk)
                data = chunk
                if inflater is not None:
                    data = inflater.decompress(chunk)
                    while inflater.eof and inflater.unused_data:  # concatenated gzip members
                        rest = inflater.unused_data
                        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        data += inflater.decompress(rest)
                tar_hash.update(data)
                out.write(data)
            if inflater is not None:
                tail = inflater.flush()
                tar_hash.update(tail)
                out.write(tail)
                if not inflater.eof:
                    raise zlib.error("compressed stream ends early")
        except (zlib.error, gzip.BadGzipFile) as exc:
            check_digest(layout.path, ref, blob_hash.hexdigest(), blob_size + _remaining(src))
            raise OciFormatError(layout.path, f"layer {ref.digest} is not valid gzip: {exc}") from exc
        tar_size = out.position
        out.write(bytes(-tar_size % TAR_BLOCK))
    check_digest(layout.path, ref, blob_hash.hexdigest(), blob_size)
    if isinstance(diff_id, str) and diff_id != f"sha256:{tar_hash.hexdigest()}":
        raise OciFormatError(layout.path, f"layer {ref.digest} uncompresses to sha256:{tar_hash.hexdigest()}, "
                                          f"but the config's diff_id is {diff_id}")
    return dest, tar_size


def _remaining(handle: Any) -> int:
    rest = 0
    while chunk := handle.read(_CHUNK):
        rest += len(chunk)
    return rest


# -- native SIF ------------------------------------------------------------------------------
def _import_native(src: str, dest: str, staging: str, *, io: FileIO) -> ImportResult:
    with SifFile.open(src) as sif:
        used = sif.used()
        if any(d.datatype == DataType.OCI_ROOT_INDEX for d in used):
            raise UsageError(src, "is already an OCI-SIF (it has an OCI root index)")
        primary = [d for d in used if d.is_primary_partition]
        if not primary:
            raise UsageError(src, "native SIF has no primary system partition")
        fs_type, _, arch = primary[0].partition()
        if fs_type != FsType.SQUASH:
            raise UsageError(src, f"primary system partition is not squashfs (fs type {int(fs_type)})")
        path = os.path.join(staging, "primary.sqfs")
        with _Staged(path, io) as out:
            for i, chunk in enumerate(sif.iter_chunks(primary[0])):
                if i == 0 and not looks_like_squashfs(chunk):
                    raise SifFormatError(src, f"primary partition (object {primary[0].id}) has no squashfs magic")
                out.write(chunk)
        architecture = sif.header.arch_name  # = the primary partition's arch (spec §1.7)
        if architecture == "unknown":
            architecture = arch_name(arch)
    digest, size = hash_file(path)
    config: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": [DEFAULT_PATH_ENV]},
        "rootfs": {"type": "layers", "diff_ids": [digest]},
        "history": [{"created_by": "sifoverlay import (native SIF primary partition)"}],
    }
    layer = ImportedLayer(digest, size, digest, "native-sif-partition", None)
    return _write(src, dest, "native-sif", f"linux/{architecture}", False,
                  [(SquashfsFile(path, digest, size), layer)], config, None, io=io)


# -- output --------------------------------------------------------------------------------
def _write(src: str, dest: str, kind: str, platform: str | None, squash: bool,
           built: list[tuple[SquashfsFile, ImportedLayer]], config: dict[str, Any],
           annotations: dict[str, Any] | None, *, io: FileIO) -> ImportResult:
    config_raw = jsonedit.canonical(config)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": jsonedit.descriptor_of(config_raw, mt.OCI_CONFIG),
        "layers": [jsonedit.make_descriptor(mt.SQUASHFS_LAYER, f.size, f.digest) for f, _ in built],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_raw = jsonedit.canonical(manifest)
    root_index = jsonedit.new_index([jsonedit.descriptor_of(manifest_raw, mt.OCI_MANIFEST)])
    # Identical layers (same digest) are stored once: SIF lookups are by digest.
    unique = {f.digest: f.path for f, _ in built}
    blobs: list[Any] = [*unique.values(), config_raw, manifest_raw]
    write_ocisif(dest, blobs, root_index, io=io)
    result = ImportResult(
        source=src, output=dest, kind=kind, platform=platform, squashed=squash,
        manifest_digest=jsonedit.digest_of(manifest_raw), config_digest=jsonedit.digest_of(config_raw),
        layers=tuple(layer for _, layer in built), file_size=os.stat(dest).st_size,
    )
    log.info("imported %s -> %s: %d layer(s), %d bytes", src, dest, len(result.layers), result.file_size)
    return result
