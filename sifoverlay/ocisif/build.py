"""Write OCI-SIF files the way sylabs/oci-tools does (spec §2.2, §2.6).

* `write_ocisif` creates a new file: blobs in the order given (oci-tools order: per image
  its layers, config, manifest; nested indexes after their children), then the root
  index, capacity = objects + `spare` (SingularityCE keeps 8 spare slots). Deterministic
  header, unaligned contiguous objects. Reproduces oci-tools' TestWrite goldens.
* `update_root_index` is oci-tools' generic UpdateRootIndex, step for step, on an
  existing file. It is NOT crash-safe (neither is Go's): it exists for golden tests and
  for tools that build new files; the engine commits through its journal instead.

Blob sources are `bytes`-like (written from memory) or a filesystem path (streamed in
4 MiB chunks, never loaded whole). Open file objects are not accepted: pass their path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

from ..errors import CapacityError, OciFormatError, UsageError
from ..fsio import REAL_IO, FileIO
from ..sif.add import add_object
from ..sif.constants import OCI_DATATYPES, DataType
from ..sif.create import write_new
from ..sif.delete import delete_objects
from ..sif.layout import Layout
from ..sif.load import SifFile
from ..sif.writeout import ObjectInput
from . import jsonedit
from .model import MAX_JSON_SIZE, Ref, check_bytes, check_index, walk_index

log = logging.getLogger(__name__)

BlobSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]
"""Bytes in memory, or the path of a file whose whole content is the blob."""

BlobItem = Union[BlobSource, tuple[BlobSource, Union[int, None]]]
"""A blob source, or (source, datatype) where datatype None means OCI.Blob."""

DEFAULT_SPARE = 8  # SingularityCE internal/pkg/ocisif/imagewriter.go spareDescriptorCapacity


def _index_bytes(root_index: bytes | bytearray | Mapping[str, Any], path: str) -> bytes:
    raw = jsonedit.canonical(root_index) if isinstance(root_index, Mapping) else bytes(root_index)
    try:
        parsed = jsonedit.parse(raw)
    except jsonedit.JsonError as exc:
        raise OciFormatError(path, f"new root index: {exc}") from None
    try:
        check_index(parsed, "new root index")
    except jsonedit.JsonError as exc:
        raise OciFormatError(path, str(exc)) from None
    return raw


def _object(item: BlobItem) -> ObjectInput:
    if isinstance(item, tuple):
        source, datatype = item
        return ObjectInput(int(datatype) if datatype is not None else DataType.OCI_BLOB, source)
    return ObjectInput(DataType.OCI_BLOB, item)


def write_ocisif(
    path: str | os.PathLike[str],
    blobs: Sequence[BlobItem],
    root_index: bytes | bytearray | Mapping[str, Any],
    *,
    spare: int = DEFAULT_SPARE,
    io: FileIO = REAL_IO,
) -> Layout:
    """Create the OCI-SIF `path` (temp file + rename: never half-written).

    blobs: ordered blob sources (see BlobSource / BlobItem); every OCI blob's digest is
      computed while it is streamed into place.
    root_index: the index JSON as bytes (stored verbatim) or a dict (stored canonical());
      it must parse as an image index.
    spare: free descriptor slots left for later updates (overlay create, reconcile).
    Returns the final Layout (descriptor ids are 1..len(blobs)+1, the root index last).
    """
    name = os.fspath(path)
    if spare < 0:
        raise UsageError(name, f"spare slot count {spare} is negative")
    raw_index = _index_bytes(root_index, name)
    objects = [_object(item) for item in blobs]
    objects.append(ObjectInput(DataType.OCI_ROOT_INDEX, raw_index))
    layout = write_new(name, objects, spare=spare, deterministic=True, io=io)
    log.debug("wrote OCI-SIF %s: %d blobs, %d spare slots", name, len(blobs), spare)
    return layout


def _read_source(source: BlobSource, ref: Ref, path: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
    else:
        src = os.fspath(source)
        size = os.stat(src).st_size
        if size > MAX_JSON_SIZE:
            raise OciFormatError(path, f"{ref.kind} {ref.digest} from {src} is {size} bytes, over the {MAX_JSON_SIZE} byte limit")
        with open(src, "rb") as handle:
            raw = handle.read()
    check_bytes(raw, ref, path)
    return raw


def _verify_source(source: BlobSource, ref: Ref, path: str) -> None:
    """Size and digest of a blob source, streamed (checked before the file is touched)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        check_bytes(bytes(source), ref, path)
        return
    src = os.fspath(source)
    hasher = hashlib.sha256()
    size = 0
    with open(src, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 << 20), b""):
            hasher.update(chunk)
            size += len(chunk)
    actual = "sha256:" + hasher.hexdigest()
    if size != ref.size or actual != ref.digest:
        raise OciFormatError(path, f"{ref.kind} {ref.digest} given as {src} has {size} bytes hashing to {actual}")


def update_root_index(
    path: str | os.PathLike[str],
    new_root_index: bytes | bytearray | Mapping[str, Any],
    blobs: Mapping[str, BlobSource],
    *,
    io: FileIO = REAL_IO,
) -> bool:
    """oci-tools UpdateRootIndex on the file `path`; returns False when the new index is
    byte-identical to the stored one (nothing written).

    `blobs` maps digest -> source for every blob the new index references that the SIF
    does not hold yet (extra entries are ignored). Steps, as in Go: keep referenced blobs
    already stored; delete (zero + compact) every other OCI blob and the old root index;
    append the missing blobs in write order; append the new root index. One deviation:
    missing or wrong sources (each is hashed once up front) and a lack of free slots are
    refused before anything is written (Go would fail half-way).
    """
    name = os.fspath(path)
    raw_index = _index_bytes(new_root_index, name)
    new_digest = jsonedit.digest_of(raw_index)
    with SifFile.open(name) as sif:
        used = sif.used()
        stored = {d.digest: d for d in used if d.datatype == DataType.OCI_BLOB and d.digest is not None}
        roots = [d for d in used if d.datatype == DataType.OCI_ROOT_INDEX]
        if len(roots) == 1 and roots[0].digest == new_digest:
            return False

        def fetch(ref: Ref) -> bytes:
            if ref.digest in blobs:
                return _read_source(blobs[ref.digest], ref, name)
            if ref.digest in stored:
                raw = sif.read(stored[ref.digest], limit=MAX_JSON_SIZE)
                check_bytes(raw, ref, name)
                return raw
            problem = f"{ref.kind} {ref.digest} is referenced by the new root index but neither stored nor given"
            raise OciFormatError(name, problem)

        refs, _ = walk_index(jsonedit.parse(raw_index), fetch, name)
        keep = {r.digest for r in refs if r.digest in stored}
        cache = [r for r in refs if r.digest not in stored]
        missing = [r.digest for r in cache if r.digest not in blobs]
        if missing:
            listed = ", ".join(missing[:3])
            raise OciFormatError(name, f"{len(missing)} blob(s) needed by the new root index are not given: {listed}")
        for ref in cache:
            _verify_source(blobs[ref.digest], ref, name)
        doomed = [d.id for d in used if d.datatype in OCI_DATATYPES and d.digest not in keep]
        free = sif.header.descriptors_free + len(doomed)
        if free < len(cache) + 1:
            needed = len(cache) + 1
            raise CapacityError(name, f"needs {needed} free descriptor slots, would have {free}", needed=needed, free=free)
    if doomed:
        delete_objects(name, doomed, zero=True, compact=True, io=io)
    for ref in cache:
        add_object(name, ObjectInput(DataType.OCI_BLOB, blobs[ref.digest], digest=ref.digest), io=io)
    add_object(name, ObjectInput(DataType.OCI_ROOT_INDEX, raw_index, digest=new_digest), io=io)
    log.debug("updated root index of %s: kept %d, deleted %d, appended %d blobs", name, len(keep), len(doomed), len(cache))
    return True
