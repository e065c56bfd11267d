"""Pure planning: the new config / manifest / root index bytes and the SIF metadata
after-image of each operation. Nothing here touches a file.

JSON is edited minimally through ocisif.jsonedit (unknown fields, annotations, platform
and other index entries are kept). In the Layout, new objects are ADDED FIRST (so they
land after the furthest live object, past every byte the old state references: R2) and
the replaced ones deleted afterwards; then DataSize is compacted to the furthest live
object. Blobs that the new graph (or another index entry) still references are kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sifoverlay.errors import CapacityError, OverlayStateError
from sifoverlay.ocisif import OVERLAY_FINGERPRINT_ANNOTATION, OciSifImage
from sifoverlay.ocisif import history as image_history
from sifoverlay.ocisif import jsonedit, mediatypes
from sifoverlay.ocisif.model import Ref, walk_index
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.layout import Layout

from .commit import BlobSource, CommitPlan, PlacedBlob
from .history import RevisionDraft, draft, history_cap

# Go's zero time, as ggcr serialises the empty history entry of an appended layer.
EMPTY_HISTORY = {"created": "0001-01-01T00:00:00Z"}


def fingerprint_text(fingerprint: Mapping[str, Any]) -> str:
    return jsonedit.canonical(dict(fingerprint)).decode("utf-8")


def _other_refs(img: OciSifImage) -> set[str]:
    """Digests referenced by root-index entries other than the selected image."""
    others = [e for e in img.root_index.json.get("manifests", []) if e.get("digest") != img.manifest.digest]
    if not others:
        return set()
    index = dict(img.root_index.json, manifests=others)

    def fetch(ref: Ref) -> bytes:
        return img.read_blob(ref.digest)

    refs, _ = walk_index(index, fetch, img.path)
    return {r.digest for r in refs}


def _replace_image(
    img: OciSifImage,
    *,
    op: str,
    config: dict[str, Any] | None,
    manifest: dict[str, Any],
    big: list[BlobSource],
    set_digest: tuple[int, str] | None = None,
    remove_ids: tuple[int, ...] = (),
    now: int | None = None,
    extra: dict[str, object] | None = None,
    revision: RevisionDraft | None = None,
) -> CommitPlan | None:
    sif = img.sif
    layout = Layout.from_file(sif)
    before = layout.metadata_bytes()
    old_length = os.fstat(sif.fd).st_size
    live = {d.digest: d for d in layout.used() if d.digest is not None}

    if config is not None:
        config_raw = jsonedit.canonical(config)
        manifest = jsonedit.replace_config(manifest, {"size": len(config_raw), "digest": jsonedit.digest_of(config_raw)})
    else:
        config_raw = img.config.raw
    config_digest = jsonedit.digest_of(config_raw)
    manifest_raw = jsonedit.canonical(manifest)
    manifest_digest = jsonedit.digest_of(manifest_raw)
    index = jsonedit.replace_manifest_entry(
        img.root_index.json, {"size": len(manifest_raw), "digest": manifest_digest}, old_digest=img.manifest.digest
    )
    index_raw = jsonedit.canonical(index)
    index_digest = jsonedit.digest_of(index_raw)
    if index_digest == img.root_index.digest:
        return None

    additions: list[tuple[int, BlobSource]] = [(DataType.OCI_BLOB, b) for b in big if b.digest not in live]
    for raw, digest in ((config_raw, config_digest), (manifest_raw, manifest_digest)):
        if digest not in live:
            additions.append((DataType.OCI_BLOB, BlobSource(digest, len(raw), data=raw)))
    additions.append((DataType.OCI_ROOT_INDEX, BlobSource(index_digest, len(index_raw), data=index_raw)))
    old_history = image_history.read_for_commit(sif) if revision is not None else None
    needed = len(additions) + (1 if revision is not None else 0)
    if layout.free_slots < needed:
        raise CapacityError(
            img.path,
            f"needs {needed} free descriptor slots for {op}, only {layout.free_slots} free",
            needed=needed, free=layout.free_slots,
        )
    placed = []
    for datatype, source in additions:
        desc = layout.add(datatype, source.size, digest=source.digest, now=now)
        placed.append(PlacedBlob(desc.offset, source))
    if set_digest is not None:
        layout.set_oci_digest(set_digest[0], set_digest[1], now=now)
    if revision is not None and old_history is not None:
        # Added last, in the same metadata write: the revision exists exactly when the commit does.
        entry = revision.revision(old_manifest=img.manifest.digest, new_manifest=manifest_digest)
        raw = old_history.appended(entry, cap=history_cap()).encode()
        layers = manifest.get("layers") or [{}]
        holder = next((d.id for d in layout.used() if d.digest is not None and d.digest == layers[-1].get("digest")), 0)
        desc = layout.add(DataType.GENERIC_JSON, len(raw), group=0, link=holder, name=image_history.HISTORY_NAME, now=now)
        placed.append(PlacedBlob(desc.offset, BlobSource(jsonedit.digest_of(raw), len(raw), data=raw)))

    keep = _other_refs(img) | {config_digest, manifest_digest}
    keep |= {layer["digest"] for layer in manifest.get("layers", []) if isinstance(layer, dict)}
    if set_digest is not None:
        keep.add(set_digest[1])
    doomed = [img.root_index.descriptor.id]
    if img.manifest.digest not in keep:
        doomed.append(img.manifest.descriptor.id)
    if img.config.digest not in keep:
        doomed.append(img.config.descriptor.id)
    doomed += [i for i in remove_ids if layout.get(i).digest not in keep]
    if old_history is not None and old_history.descriptor is not None:
        doomed.append(old_history.descriptor.id)
    freed = []
    for object_id in dict.fromkeys(doomed):
        desc = layout.delete(object_id, now=now)
        freed.append((desc.offset, desc.size))
    new_length = layout.compact()
    return CommitPlan(
        op=op, before=before, after=layout.metadata_bytes(), blobs=tuple(placed), freed=tuple(freed),
        old_length=old_length, new_length=new_length, old_root_digest=img.root_index.digest,
        new_root_digest=index_digest, extra=dict(extra or {}, manifest_digest=manifest_digest, config_digest=config_digest),
    )


def plan_sync(img: OciSifImage, *, new_digest: str, fingerprint: Mapping[str, Any], now: int | None = None,
              revision: RevisionDraft | None = None) -> CommitPlan | None:
    """Overlay bytes now hash to `new_digest`: descriptor extra, manifest last layer and
    last diff_id follow; the fingerprint annotation is refreshed. Offset/size unchanged.
    With an unchanged digest only the annotation (manifest + index) changes."""
    overlay = img.require_overlay()
    last = len(img.layers) - 1
    annotations = dict(img.layers[last].annotations)
    annotations[OVERLAY_FINGERPRINT_ANNOTATION] = fingerprint_text(fingerprint)
    manifest = jsonedit.replace_layer(img.manifest.json, last, {"digest": new_digest, "annotations": annotations})
    changed = new_digest != overlay.recorded_digest
    config = jsonedit.set_diff_id(img.config.json, -1, new_digest) if changed else None
    return _replace_image(
        img, op="sync", config=config, manifest=manifest, big=[],
        set_digest=(overlay.descriptor.id, new_digest) if changed else None, now=now,
        extra={"overlay_digest": new_digest, "old_overlay_digest": overlay.recorded_digest},
        revision=revision or draft("sync", None, old_overlay=overlay.recorded_digest, new_overlay=new_digest,
                                   bytes_hashed=overlay.size),
    )


def plan_create(img: OciSifImage, *, ext3: BlobSource, fingerprint: Mapping[str, Any], now: int | None = None,
                revision: RevisionDraft | None = None) -> CommitPlan:
    """Append the ext3 as the last layer (diff_id + empty history entry, like ggcr)."""
    if img.overlay is not None:
        raise OverlayStateError(img.path, "image already has an overlay")
    layer = jsonedit.make_descriptor(
        mediatypes.EXT3_LAYER, ext3.size, ext3.digest,
        annotations={OVERLAY_FINGERPRINT_ANNOTATION: fingerprint_text(fingerprint)},
    )
    manifest = jsonedit.append_layer(img.manifest.json, layer)
    config = jsonedit.append_history(jsonedit.append_diff_id(img.config.json, ext3.digest), EMPTY_HISTORY)
    plan = _replace_image(img, op="create", config=config, manifest=manifest, big=[ext3], now=now,
                          extra={"overlay_digest": ext3.digest},
                          revision=revision or draft("create", None, old_overlay=None, new_overlay=ext3.digest,
                                                     bytes_hashed=ext3.size))
    assert plan is not None  # a new layer always changes the index
    return plan


def plan_seal(img: OciSifImage, *, squashfs: BlobSource, now: int | None = None,
              revision: RevisionDraft | None = None) -> CommitPlan:
    """Replace the ext3 layer by a squashfs layer; the ext3 object is freed."""
    overlay = img.require_overlay()
    last = len(img.layers) - 1
    annotations = {k: v for k, v in img.layers[last].annotations.items() if k != OVERLAY_FINGERPRINT_ANNOTATION}
    manifest = jsonedit.replace_layer(
        img.manifest.json, last,
        {"mediaType": mediatypes.SQUASHFS_LAYER, "size": squashfs.size, "digest": squashfs.digest,
         "annotations": annotations or None},
    )
    config = jsonedit.set_diff_id(img.config.json, -1, squashfs.digest)
    plan = _replace_image(
        img, op="seal", config=config, manifest=manifest, big=[squashfs],
        remove_ids=(overlay.descriptor.id,), now=now, extra={"layer_digest": squashfs.digest},
        revision=revision or draft("seal", None, old_overlay=overlay.recorded_digest, new_overlay=None,
                                   bytes_hashed=squashfs.size, detail={"layer": squashfs.digest}),
    )
    assert plan is not None
    return plan


def plan_resize(img: OciSifImage, *, ext3: BlobSource, fingerprint: Mapping[str, Any], now: int | None = None,
                revision: RevisionDraft | None = None) -> CommitPlan:
    """The resized copy of the ext3 replaces the overlay: appended as a new object (the
    old one is freed and punched), manifest layer size/digest, last diff_id, fingerprint."""
    overlay = img.require_overlay()
    last = len(img.layers) - 1
    annotations = dict(img.layers[last].annotations)
    annotations[OVERLAY_FINGERPRINT_ANNOTATION] = fingerprint_text(fingerprint)
    manifest = jsonedit.replace_layer(img.manifest.json, last,
                                      {"size": ext3.size, "digest": ext3.digest, "annotations": annotations})
    config = jsonedit.set_diff_id(img.config.json, -1, ext3.digest)
    plan = _replace_image(
        img, op="resize", config=config, manifest=manifest, big=[ext3], remove_ids=(overlay.descriptor.id,), now=now,
        extra={"overlay_digest": ext3.digest, "old_overlay_digest": overlay.recorded_digest},
        revision=revision or draft("resize", None, old_overlay=overlay.recorded_digest, new_overlay=ext3.digest,
                                   bytes_hashed=ext3.size),
    )
    assert plan is not None
    return plan

