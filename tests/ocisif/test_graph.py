"""Property tests: generated OCI graphs (mostly valid, with random damage at every level)
are either opened correctly or refused with one typed, one-line error; never a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sifoverlay.cli.cmd_inspect import inspect_file
from sifoverlay.errors import BadInput
from sifoverlay.ocisif import jsonedit, mediatypes, open_image
from sifoverlay.ocisif.build import write_ocisif
from sifoverlay.ocisif.graph import Ref, check_index, select_image_entries, walk_index

KEYS = ["mediaType", "digest", "size", "manifests", "layers", "config", "annotations", "schemaVersion"]
scalars = st.none() | st.booleans() | st.integers(-2, 99) | st.text(max_size=6) | st.sampled_from([mediatypes.OCI_INDEX, mediatypes.OCI_MANIFEST, mediatypes.EXT3_LAYER])
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def damaged(draw: Any, doc: dict[str, Any]) -> Any:
    """`doc`, or (one time in four) with one key replaced, removed or the whole document swapped."""
    choice = draw(st.integers(0, 11))
    if choice == 0:
        return draw(any_json)
    if choice == 1:
        return {k: v for k, v in doc.items() if k != draw(st.sampled_from(KEYS))}
    if choice == 2:
        return dict(doc, **{draw(st.sampled_from(KEYS)): draw(any_json)})
    return doc


def desc(raw: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    return jsonedit.descriptor_of(raw, media_type, **extra)


@st.composite
def oci_graph(draw: Any) -> tuple[bytes, list[bytes], int]:
    """(root index bytes, blobs to store, number of top-level selectable images intended)."""
    blobs: list[bytes] = []
    entries: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        layers = draw(st.lists(st.binary(min_size=1, max_size=12), min_size=0, max_size=3, unique=True))
        types = [draw(st.sampled_from([mediatypes.SQUASHFS_LAYER, mediatypes.SQUASHFS_LAYER, mediatypes.EXT3_LAYER])) for _ in layers]
        layer_descs = [desc(raw, t) for raw, t in zip(layers, types)]
        if layer_descs and draw(st.integers(0, 5)) == 0:  # a lying layer descriptor
            layer_descs[-1] = dict(layer_descs[-1], size=layer_descs[-1]["size"] + draw(st.sampled_from([-1, 1])))
        config = jsonedit.canonical(draw(damaged({"architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]}})))
        manifest_type = draw(st.sampled_from([mediatypes.OCI_MANIFEST, mediatypes.DOCKER_MANIFEST]))
        manifest_doc = {"schemaVersion": 2, "mediaType": manifest_type, "config": desc(config, mediatypes.OCI_CONFIG), "layers": layer_descs}
        manifest = jsonedit.canonical(draw(damaged(manifest_doc)))
        annotations = {"org.opencontainers.image.ref.name": "_cosign:x.sig"} if draw(st.integers(0, 4)) == 0 else None
        entry = desc(manifest, manifest_type, annotations=annotations)
        blobs += layers + [config, manifest]
        if draw(st.integers(0, 4)) == 0:  # hide it in a nested index
            child = jsonedit.canonical(draw(damaged(jsonedit.new_index([entry]))))
            blobs.append(child)
            entry = desc(child, mediatypes.OCI_INDEX)
        entries.append(entry)
    if draw(st.integers(0, 5)) == 0:
        other = draw(st.binary(max_size=8))
        blobs.append(other)
        entries.append(desc(other, "application/octet-stream"))
    if blobs and draw(st.integers(0, 5)) == 0:  # a missing blob
        blobs.pop(draw(st.integers(0, len(blobs) - 1)))
    root = jsonedit.canonical(draw(damaged(jsonedit.new_index(entries))))
    return root, list(dict.fromkeys(blobs)), len(entries)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(oci_graph())
def test_pure_rules_only_raise_typed_errors(graph: tuple[bytes, list[bytes], int]) -> None:
    root, blobs, _ = graph
    by_digest = {jsonedit.digest_of(raw): raw for raw in blobs}
    index = jsonedit.parse(root)
    select_image_entries(index) if isinstance(index, dict) else None
    try:
        check_index(index)
    except jsonedit.JsonError:
        return

    def fetch(ref: Ref) -> bytes:
        return by_digest.get(ref.digest, b"{}")

    try:
        refs, _ = walk_index(index, fetch, "mem")
    except BadInput:
        return
    assert len({r.digest for r in refs}) == len(refs)


OUTCOMES: dict[str, int] = {}
FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None  # fsync is free on tmpfs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(oci_graph())
def test_open_image_and_inspect_on_generated_files(graph: tuple[bytes, list[bytes], int]) -> None:
    root, blobs, _ = graph
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as tmp:
        path = Path(tmp) / "g.sif"
        try:
            write_ocisif(path, blobs, root, spare=1)
        except BadInput:
            OUTCOMES["refused by write"] = OUTCOMES.get("refused by write", 0) + 1
            return
        try:
            with open_image(path) as image:
                assert image.manifest.digest in {jsonedit.digest_of(raw) for raw in blobs}
                assert all(layer.descriptor.size == layer.size for layer in image.layers)
                assert image.overlay is None or image.layers[-1].media_type == mediatypes.EXT3_LAYER
                OUTCOMES["opened"] = OUTCOMES.get("opened", 0) + 1
        except BadInput as exc:
            assert "\n" not in str(exc) and str(exc).startswith(f"{path}: ")
            OUTCOMES[type(exc).__name__] = OUTCOMES.get(type(exc).__name__, 0) + 1
        try:
            report = inspect_file(str(path))
            assert report["descriptors"][-1]["datatype"] == 16394
        except BadInput as exc:
            assert "\n" not in str(exc)


def test_generated_files_reach_every_outcome() -> None:
    """Guards the generator: the property test above must see opened images and refusals."""
    if not OUTCOMES:
        test_open_image_and_inspect_on_generated_files()
    assert OUTCOMES.get("opened", 0) > 0 and OUTCOMES.get("OciFormatError", 0) > 0 and OUTCOMES.get("NotAnOciSif", 0) > 0
