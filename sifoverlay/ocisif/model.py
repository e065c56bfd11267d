"""The OCI-SIF image model: root index, the single image SingularityCE runs, its layers and
the embedded ext3 overlay (spec §2.1, §2.5, §3.2).

`open_image` validates the whole OCI graph stored in the SIF: every referenced blob must
resolve by digest, every small JSON document must match its digest and size, every layer's
size must match its SIF object. Layers are never hashed here (an overlay is >= 64 MiB and
its recorded digest is stale by design while a job writes); `verify_layers()` streams them
on request.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import NotAnOciSif, OciFormatError, OverlayStateError
from ..sif.constants import DataType
from ..sif.descriptor import Descriptor
from ..sif.load import SifFile
from . import jsonedit, mediatypes
from .graph import (  # re-exported: the selection rules belong to the image model's API
    MAX_INDEX_DEPTH as MAX_INDEX_DEPTH,
    COSIGN_PREFIX as COSIGN_PREFIX,
    REF_NAME_ANNOTATION as REF_NAME_ANNOTATION,
    Ref as Ref,
    check_bytes as check_bytes,
    check_descriptor as check_descriptor,
    check_index as check_index,
    check_manifest as check_manifest,
    is_cosign_entry as is_cosign_entry,
    is_json_type as is_json_type,
    parse_json as parse_json,
    select_image_entries as select_image_entries,
    walk_index as walk_index,
)

log = logging.getLogger(__name__)

OVERLAY_FINGERPRINT_ANNOTATION: Final = "dev.sifoverlay.overlay.fingerprint"
MAX_JSON_SIZE: Final = 8 << 20  # manifests/configs/indexes are KiB; refuse absurd ones
CONVERT_HINT: Final = "convert it with `sifoverlay import {path} OUT.oci.sif`"
NATIVE_HINT: Final = "a native SIF: " + CONVERT_HINT


@dataclass(frozen=True, slots=True)
class Blob:
    """A small JSON object of the image: its SIF descriptor, bytes, parsed JSON, digest."""

    descriptor: Descriptor
    raw: bytes
    json: Any
    digest: str


@dataclass(frozen=True, slots=True)
class Layer:
    media_type: str
    digest: str
    size: int
    descriptor: Descriptor
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def offset(self) -> int:
        return self.descriptor.offset


@dataclass(frozen=True, slots=True)
class Overlay:
    """The writable ext3 layer: the manifest's last layer, stored as an unaligned OCI blob."""

    descriptor: Descriptor
    offset: int
    size: int
    recorded_digest: str  # the manifest's (and SIF extra's) digest, stale after writes
    fingerprint: dict[str, Any] | None  # our annotation from the last reconcile, if any


# -- the image ---------------------------------------------------------------------------------
class OciSifImage:
    """A validated OCI-SIF and its selected image. Close it (or use `with`) when done;
    it closes the SifFile only if `open_image` opened it."""

    def __init__(
        self,
        sif: SifFile,
        root_index: Blob,
        manifest_entry: dict[str, Any],
        manifest: Blob,
        config: Blob,
        layers: list[Layer],
        overlay: Overlay | None,
        blobs: dict[str, Descriptor],
        *,
        owns_sif: bool,
    ) -> None:
        self.sif = sif
        self.root_index = root_index
        self.manifest_entry = manifest_entry
        self.manifest = manifest
        self.config = config
        self.layers = layers
        self.overlay = overlay
        self._blobs = blobs
        self._owns_sif = owns_sif

    @property
    def path(self) -> str:
        return self.sif.path

    def require_overlay(self) -> Overlay:
        """The writable overlay; OverlayStateError when the last layer is not ext3."""
        if self.overlay is None:
            raise OverlayStateError(self.path, "image does not contain a writable overlay (last layer is not ext3)")
        return self.overlay

    def blob(self, digest: str) -> Descriptor:
        """The SIF object holding `digest` (OciFormatError if there is none)."""
        try:
            return self._blobs[digest]
        except KeyError:
            raise OciFormatError(self.path, f"no OCI blob with digest {digest}") from None

    def read_blob(self, digest: str, *, limit: int = MAX_JSON_SIZE) -> bytes:
        """Bytes of a small blob, checked against its digest."""
        desc = self.blob(digest)
        if desc.size > limit:
            raise OciFormatError(self.path, f"blob {digest} is {desc.size} bytes, over the {limit} byte read limit")
        raw = self.sif.read(desc, limit=limit)
        check_bytes(raw, Ref(digest, desc.size, "", "blob"), self.path)
        return raw

    def verify_layers(self, *, include_overlay: bool = False, chunk: int = 4 << 20) -> None:
        """Stream every layer and compare with its digest (OciFormatError on the first
        mismatch). The overlay is skipped unless asked: its digest is stale while in use."""
        for number, layer in enumerate(self.layers):
            if self.overlay is not None and layer.descriptor == self.overlay.descriptor and not include_overlay:
                continue
            hasher = hashlib.sha256()
            for piece in self.sif.iter_chunks(layer.descriptor, chunk):
                hasher.update(piece)
            actual = "sha256:" + hasher.hexdigest()
            if actual != layer.digest:
                raise OciFormatError(self.path, f"layer {number} {layer.digest} does not match its bytes (they hash to {actual})")

    def close(self) -> None:
        if self._owns_sif:
            self.sif.close()

    def __enter__(self) -> OciSifImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        overlay = self.overlay is not None
        return f"OciSifImage({self.path!r}, manifest={self.manifest.digest}, layers={len(self.layers)}, overlay={overlay})"


def root_index_descriptor(sif: SifFile) -> Descriptor:
    """The one OCIRootIndex object (NotAnOciSif if none, OciFormatError if several)."""
    roots = [d for d in sif.used() if d.datatype == DataType.OCI_ROOT_INDEX]
    if not roots:
        raise NotAnOciSif(sif.path, f"not an OCI-SIF: no OCI root index object ({NATIVE_HINT.format(path=sif.path)})",
                          native=True)
    if len(roots) > 1:
        ids = ", ".join(str(d.id) for d in roots)
        raise OciFormatError(sif.path, f"{len(roots)} OCI root index objects (ids {ids}), expected one")
    return roots[0]


def oci_blob_table(sif: SifFile) -> dict[str, list[Descriptor]]:
    table: dict[str, list[Descriptor]] = {}
    for desc in sif.used():
        if desc.datatype == DataType.OCI_BLOB and desc.digest is not None:
            table.setdefault(desc.digest, []).append(desc)
    return table


def read_root_index(sif: SifFile) -> Blob:
    desc = root_index_descriptor(sif)
    digest = desc.digest
    if digest is None:
        raise OciFormatError(sif.path, f"root index object {desc.id} has no digest")
    if desc.size > MAX_JSON_SIZE:
        raise OciFormatError(sif.path, f"root index is {desc.size} bytes, over the {MAX_JSON_SIZE} byte limit")
    raw = sif.read(desc, limit=MAX_JSON_SIZE)
    check_bytes(raw, Ref(digest, desc.size, mediatypes.OCI_INDEX, "root index"), sif.path)
    obj = parse_json(raw, None, "root index", sif.path)
    try:
        check_index(obj, "root index")
    except jsonedit.JsonError as exc:
        raise OciFormatError(sif.path, str(exc)) from None
    return Blob(desc, raw, obj, digest)


class _Store:
    """The OCI blobs of one SIF by digest: resolve a reference, read a small blob."""

    def __init__(self, sif: SifFile) -> None:
        self.sif = sif
        self.table = oci_blob_table(sif)
        self.unique = {digest: descs[0] for digest, descs in self.table.items() if len(descs) == 1}

    def lookup(self, ref: Ref) -> Descriptor:
        path = self.sif.path
        found = self.table.get(ref.digest, [])
        if not found:
            raise OciFormatError(path, f"{ref.kind} {ref.digest} is referenced but not stored in the SIF")
        if len(found) > 1:
            raise OciFormatError(path, f"{ref.kind} {ref.digest} is stored twice (objects {', '.join(str(d.id) for d in found)})")
        desc = found[0]
        if desc.size != ref.size:
            raise OciFormatError(
                path,
                f"{ref.kind} {ref.digest} is referenced with size {ref.size} "
                f"but its SIF object {desc.id} holds {desc.size} bytes",
            )
        return desc

    def fetch(self, ref: Ref) -> bytes:
        desc = self.lookup(ref)
        if desc.size > MAX_JSON_SIZE:
            problem = f"{ref.kind} {ref.digest} is {desc.size} bytes, over the {MAX_JSON_SIZE} byte limit"
            raise OciFormatError(self.sif.path, problem)
        raw = self.sif.read(desc, limit=MAX_JSON_SIZE)
        check_bytes(raw, ref, self.sif.path)
        return raw

    def blob(self, descriptor: Mapping[str, Any], kind: str) -> Blob:
        ref = Ref(descriptor["digest"], descriptor["size"], descriptor["mediaType"], kind)
        raw = self.fetch(ref)
        return Blob(self.unique[ref.digest], raw, parse_json(raw, ref, kind, self.sif.path), ref.digest)


class _Graph(_Store):
    """The validated graph of one SIF: root index, referenced blobs, parsed documents."""

    def __init__(self, sif: SifFile) -> None:
        super().__init__(sif)
        self.root = read_root_index(sif)
        self._configs_checked: set[str] = set()
        self.refs, self.docs = walk_index(self.root.json, self.fetch, sif.path, check=self._check)

    def _check(self, ref: Ref) -> None:
        """Every reference resolves with its size; JSON configs also match their digest."""
        self.lookup(ref)
        if ref.kind == "config" and is_json_type(ref.media_type) and ref.digest not in self._configs_checked:
            parse_json(self.fetch(ref), ref, "config", self.sif.path)
            self._configs_checked.add(ref.digest)


def _pick_entry(root: Blob, manifest_digest: str | None, path: str) -> dict[str, Any]:
    if manifest_digest is not None:
        chosen = [
            e for e in root.json.get("manifests") or []
            if e.get("digest") == manifest_digest and mediatypes.is_image_manifest(e.get("mediaType"))
        ]
        if not chosen:
            raise NotAnOciSif(path, f"root index has no image manifest {manifest_digest}")
        entry: dict[str, Any] = chosen[0]
        return entry
    candidates = select_image_entries(root.json)
    if not candidates:
        raise NotAnOciSif(path, "no image: the root index lists no image manifest")
    if len(candidates) > 1:
        raise NotAnOciSif(path, f"{len(candidates)} images in the root index; SingularityCE needs exactly one")
    return candidates[0]


def _fingerprint(annotations: Mapping[str, Any], path: str) -> dict[str, Any] | None:
    text = annotations.get(OVERLAY_FINGERPRINT_ANNOTATION)
    if text is None:
        return None
    try:
        value = jsonedit.parse(text.encode("utf-8")) if isinstance(text, str) else None
    except jsonedit.JsonError:
        value = None
    if not isinstance(value, dict):
        # Our own bookkeeping, not image content: treat as absent (state "unknown").
        log.warning("%s: ignoring malformed %s annotation", path, OVERLAY_FINGERPRINT_ANNOTATION)
        return None
    return value


def _build(sif: SifFile, manifest_digest: str | None, *, owns_sif: bool) -> OciSifImage:
    graph = _Graph(sif)
    entry = _pick_entry(graph.root, manifest_digest, sif.path)
    return _image_of(graph, graph.root, entry, owns_sif=owns_sif)


def _image_of(store: _Store, root: Blob, entry: Mapping[str, Any], *, owns_sif: bool) -> OciSifImage:
    """The image of one (checked) image-manifest descriptor: only its own blobs are
    resolved and checked, so one broken image does not hide the others."""
    sif = store.sif
    path = sif.path
    manifest = store.blob(entry, "manifest")
    try:
        check_manifest(manifest.json, entry["mediaType"], f"manifest {manifest.digest}")
    except jsonedit.JsonError as exc:
        raise OciFormatError(path, str(exc)) from None
    config = store.blob(manifest.json["config"], "config")
    if not isinstance(config.json, dict):
        raise OciFormatError(path, f"config {config.digest} of the image is not a JSON object")
    layers: list[Layer] = []
    overlay: Overlay | None = None
    entries = manifest.json["layers"]
    for number, item in enumerate(entries):
        annotations = item.get("annotations") if isinstance(item.get("annotations"), dict) else {}
        descriptor = store.lookup(Ref(item["digest"], item["size"], item["mediaType"], "layer"))
        layer = Layer(item["mediaType"], item["digest"], item["size"], descriptor, dict(annotations))
        layers.append(layer)
        if layer.media_type == mediatypes.EXT3_LAYER:
            if number != len(entries) - 1:
                problem = f"ext3 overlay layer {layer.digest} is layer {number} of {len(entries)}; it must be the last"
                raise OciFormatError(path, problem)
            overlay = Overlay(layer.descriptor, layer.offset, layer.size, layer.digest, _fingerprint(annotations, path))
    return OciSifImage(sif, root, dict(entry), manifest, config, layers, overlay, store.unique, owns_sif=owns_sif)


def open_image(source: str | os.PathLike[str] | SifFile, *, manifest_digest: str | None = None) -> OciSifImage:
    """Open and validate an OCI-SIF and select its image.

    `source` is a path (opened read-only, closed by `OciSifImage.close`) or an open
    SifFile (left open). The image is the single top-level image SingularityCE would run,
    or the top-level image manifest `manifest_digest` when given. Raises NotAnOciSif (no
    root index, no image, several images) or OciFormatError (invalid JSON, missing or
    mismatching blobs, misplaced ext3 layer), one line naming the file.
    """
    if isinstance(source, SifFile):
        return _build(source, manifest_digest, owns_sif=False)
    sif = SifFile.open(source)
    try:
        return _build(sif, manifest_digest, owns_sif=True)
    except BaseException:
        sif.close()
        raise


def iter_refs(sif: SifFile) -> Iterator[Ref]:
    """Every blob referenced from the root index, in oci-tools write order, after
    validating the whole graph (as open_image does, but without selecting an image)."""
    yield from _Graph(sif).refs


# -- a tolerant survey (inspect) ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SurveyedImage:
    """One image manifest named by the root index (or an index below it). `image` is the
    opened image when its own blobs are valid, else `error` says why (one line, no path)."""

    position: tuple[int, ...]  # entry numbers from the root index down
    entry: Mapping[str, Any]
    image: OciSifImage | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Survey:
    """What an OCI-SIF holds, as far as it is valid. `selected` is the image SingularityCE
    (and every overlay verb) would use, when there is exactly one valid candidate."""

    root_index: Blob | None
    images: tuple[SurveyedImage, ...]
    selected: SurveyedImage | None
    warnings: tuple[str, ...]


def _problem(exc: Exception) -> str:
    """The one-line reason of a SifOverlayError or JsonError, without the file name."""
    problem = getattr(exc, "problem", None)
    return " ".join(str(problem if problem is not None else exc).split())


def survey(sif: SifFile) -> Survey:
    """Every image of an OCI-SIF with the reason when one is invalid, never raising for
    the OCI content (inspect shows what it can). NotAnOciSif when there is no root index."""
    from ..errors import SifOverlayError

    desc = root_index_descriptor(sif)
    warnings: list[str] = []
    images: list[SurveyedImage] = []
    digest = desc.digest or ""
    if desc.size > MAX_JSON_SIZE:
        warnings.append(f"root index is {desc.size} bytes, over the {MAX_JSON_SIZE} byte limit: not read")
        return Survey(None, (), None, tuple(warnings))
    try:
        raw = sif.read(desc, limit=MAX_JSON_SIZE)
    except SifOverlayError as exc:
        warnings.append(f"root index: {_problem(exc)}")
        return Survey(None, (), None, tuple(warnings))
    try:
        check_bytes(raw, Ref(digest, desc.size, mediatypes.OCI_INDEX, "root index"), sif.path)
    except SifOverlayError as exc:
        warnings.append(_problem(exc))
    try:
        obj = parse_json(raw, None, "root index", sif.path)
    except SifOverlayError as exc:
        warnings.append(_problem(exc))
        return Survey(None, (), None, tuple(warnings))
    root = Blob(desc, raw, obj, digest)
    def judge_index(index: Any, what: str) -> bool:
        """Warn about what is wrong with an index itself (its entries are judged one by
        one by `visit`); False when it has no list of entries to visit."""
        entries = index.get("manifests", []) if isinstance(index, dict) else None
        try:
            check_index({**index, "manifests": []} if isinstance(entries, list) else index, what)
        except jsonedit.JsonError as exc:
            warnings.append(_problem(exc))
        return isinstance(entries, list)

    if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
        judge_index(obj, "root index")
        return Survey(root, (), None, tuple(warnings))
    store = _Store(sif)
    seen_indexes: set[str] = set()  # each nested index is read once (a DAG may name one many times)
    opened: dict[tuple[str, int, str], tuple[OciSifImage | None, str | None]] = {}

    def visit(index: Mapping[str, Any], where: tuple[int, ...], label: str) -> None:
        for number, entry in enumerate(index.get("manifests") or []):
            position = (*where, number)
            what = f"{label} entry {number}"
            media_type = entry.get("mediaType") if isinstance(entry, dict) else None
            try:
                check_descriptor(entry, what)
            except jsonedit.JsonError as exc:
                if mediatypes.is_image_manifest(media_type):
                    images.append(SurveyedImage(position, entry, None, _problem(exc)))
                else:
                    warnings.append(_problem(exc))
                continue
            if mediatypes.is_image_manifest(media_type):
                key = (str(entry["digest"]), int(entry["size"]), str(media_type))
                if key not in opened:  # an index may name one manifest many times: open it once
                    try:
                        opened[key] = (_image_of(store, root, entry, owns_sif=False), None)
                    except (SifOverlayError, jsonedit.JsonError) as exc:
                        opened[key] = (None, _problem(exc))
                image, problem = opened[key]
                images.append(SurveyedImage(position, entry, image, problem))
            elif mediatypes.is_index(media_type):
                if len(position) >= MAX_INDEX_DEPTH:
                    warnings.append(f"{what}: indexes nested deeper than {MAX_INDEX_DEPTH} levels: not read")
                    continue
                if entry["digest"] in seen_indexes:
                    continue
                seen_indexes.add(entry["digest"])
                try:
                    child = store.blob(entry, "index")
                except SifOverlayError as exc:
                    warnings.append(f"{what}: {_problem(exc)}")
                    continue
                if not judge_index(child.json, f"index {child.digest}"):
                    continue
                visit(child.json, position, f"index {child.digest}")
            else:
                try:
                    store.lookup(Ref(entry["digest"], entry["size"], str(media_type), "blob"))
                except SifOverlayError as exc:
                    warnings.append(f"{what}: {_problem(exc)}")

    judge_index(obj, "root index")
    visit(obj, (), "root index")
    candidates = select_image_entries(obj)
    chosen = {id(c) for c in candidates}
    top = [item for item in images if len(item.position) == 1 and id(item.entry) in chosen]
    selected = None
    if not candidates:
        warnings.append("the root index lists no image")
    elif len(candidates) > 1:
        warnings.append(f"{len(candidates)} images in the root index; SingularityCE needs exactly one "
                        "(the overlay verbs refuse this file)")
    elif top and top[0].image is not None:
        selected = top[0]
    else:
        warnings.append("the only image is invalid (the overlay verbs refuse this file)")
    return Survey(root, tuple(images), selected, tuple(warnings))
