"""Pure rules of the OCI graph inside an OCI-SIF: descriptor/index/manifest shape checks,
SingularityCE's image selection (spec §2.5) and the walk in oci-tools write order (§2.2).

Nothing here touches a file: `walk_index` gets its bytes through a `fetch` callback, so
the same walk validates an open image (model) and plans an update (build).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..errors import OciFormatError
from . import jsonedit, mediatypes

REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
COSIGN_PREFIX: Final = "_cosign"  # oci-tools sourcesink.CosignPlaceholderRepo
MAX_INDEX_DEPTH: Final = 16
MAX_SIZE: Final = (1 << 63) - 1  # Go's int64, what ggcr reads a descriptor size into


@dataclass(frozen=True, slots=True)
class Ref:
    """One blob referenced from an index graph, in oci-tools write order."""

    digest: str
    size: int
    media_type: str
    kind: str  # "layer" | "config" | "manifest" | "index" | "blob"


# -- pure checks on parsed JSON ------------------------------------------------------------
def _short(value: Any, limit: int = 80) -> str:
    """repr() for an error message, cut so a hostile document cannot flood the line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_descriptor(obj: Any, where: str) -> None:
    """mediaType (str), digest (sha256), size (int >= 0), as ggcr needs them."""
    if not isinstance(obj, dict):
        raise jsonedit.JsonError(f"{where} is not a JSON object")
    if not isinstance(obj.get("mediaType"), str):
        raise jsonedit.JsonError(f"{where} has no mediaType")
    if not jsonedit.is_digest(obj.get("digest")):
        raise jsonedit.JsonError(f"{where} has no valid sha256 digest ({_short(obj.get('digest'))})")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
        raise jsonedit.JsonError(f"{where} has no valid size ({_short(size)})")


def _check_schema_version(obj: dict[str, Any], what: str) -> None:
    if "schemaVersion" in obj and obj["schemaVersion"] != 2:
        raise jsonedit.JsonError(f"{what} has schemaVersion {_short(obj['schemaVersion'])}, expected 2")


def check_index(obj: Any, what: str = "index") -> None:
    """An OCI image index or Docker manifest list (`{}` is an empty index)."""
    if not isinstance(obj, dict):
        raise jsonedit.JsonError(f"{what} is not a JSON object")
    media_type = obj.get("mediaType")
    if media_type is not None and not mediatypes.is_index(media_type):
        raise jsonedit.JsonError(f"{what} has mediaType {_short(media_type)}, not an image index")
    if "layers" in obj or "config" in obj:
        raise jsonedit.JsonError(f"{what} is an image manifest, not an index")
    _check_schema_version(obj, what)
    manifests = obj.get("manifests", [])
    if not isinstance(manifests, list):
        raise jsonedit.JsonError(f"{what} manifests is not a list")
    for i, entry in enumerate(manifests):
        check_descriptor(entry, f"{what} entry {i}")


def check_manifest(obj: Any, media_type: str, what: str = "manifest") -> None:
    if not isinstance(obj, dict):
        raise jsonedit.JsonError(f"{what} is not a JSON object")
    own_type = obj.get("mediaType")
    if own_type is not None and own_type != media_type:
        raise jsonedit.JsonError(f"{what} has mediaType {_short(own_type)} but is referenced as {_short(media_type)}")
    _check_schema_version(obj, what)
    check_descriptor(obj.get("config"), f"{what} config")
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise jsonedit.JsonError(f"{what} has no layers list")
    for i, layer in enumerate(layers):
        check_descriptor(layer, f"{what} layer {i}")


def is_cosign_entry(entry: Mapping[str, Any]) -> bool:
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict):
        return False
    name = annotations.get(REF_NAME_ANNOTATION)
    return isinstance(name, str) and name.startswith(COSIGN_PREFIX)


def select_image_entries(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-level entries SingularityCE would consider (ggcr partial.FindImages with
    oci-tools' cosign skip): image manifest types only, no recursion, `_cosign*` skipped."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        return []
    return [
        e
        for e in manifests
        if isinstance(e, dict) and mediatypes.is_image_manifest(e.get("mediaType")) and not is_cosign_entry(e)
    ]


def check_bytes(raw: bytes, ref: Ref, path: str) -> None:
    """The fetched bytes of a reference must match its size and digest."""
    if len(raw) != ref.size:
        raise OciFormatError(path, f"{ref.kind} {ref.digest} is {len(raw)} bytes but referenced with size {ref.size}")
    actual = jsonedit.digest_of(raw)
    if actual != ref.digest:
        raise OciFormatError(path, f"{ref.kind} {ref.digest} does not match its bytes (they hash to {actual})")


def parse_json(raw: bytes, ref: Ref | None, what: str, path: str) -> Any:
    try:
        return jsonedit.parse(raw)
    except jsonedit.JsonError as exc:
        label = f"{what} {ref.digest}" if ref is not None else what
        raise OciFormatError(path, f"{label}: {exc}") from None


def walk_index(
    index: Mapping[str, Any],
    fetch: Callable[[Ref], bytes],
    path: str,
    *,
    check: Callable[[Ref], object] | None = None,
) -> tuple[list[Ref], dict[str, Any]]:
    """Every blob the index graph references, in oci-tools write order (image: layers,
    config, manifest; nested index: children, then the index; other: the blob), each
    digest once. `fetch(ref)` returns verified bytes of manifests and nested indexes;
    `check(ref)` is called for EVERY reference (a digest may be referenced several times,
    with different sizes or roles). Every manifest and index is validated in every role
    it is referenced with. Returns (refs, parsed manifests and indexes by digest)."""
    refs: list[Ref] = []
    docs: dict[str, Any] = {}
    seen: set[str] = set()
    validated: set[tuple[str, str]] = set()  # (digest, media type) already parsed and checked

    def add(ref: Ref) -> None:
        if check is not None:
            check(ref)
        if ref.digest not in seen:
            seen.add(ref.digest)
            refs.append(ref)

    def load(ref: Ref, checker: Callable[[Any, str, str], None]) -> Any | None:
        """Parsed and checked document, or None when this role was validated before."""
        key = (ref.digest, ref.media_type)
        if key in validated:
            return None
        doc = parse_json(fetch(ref), ref, ref.kind, path)
        try:
            checker(doc, ref.media_type, f"{ref.kind} {ref.digest}")
        except jsonedit.JsonError as exc:
            raise OciFormatError(path, str(exc)) from None
        validated.add(key)
        docs[ref.digest] = doc
        return doc

    def visit(idx: Mapping[str, Any], depth: int) -> None:
        if depth > MAX_INDEX_DEPTH:
            raise OciFormatError(path, f"indexes nested deeper than {MAX_INDEX_DEPTH} levels")
        for entry in idx.get("manifests") or []:
            media_type = entry["mediaType"]
            if mediatypes.is_image_manifest(media_type):
                ref = Ref(entry["digest"], entry["size"], media_type, "manifest")
                manifest = load(ref, check_manifest)
                if manifest is not None:
                    for layer in manifest["layers"]:
                        add(Ref(layer["digest"], layer["size"], layer["mediaType"], "layer"))
                    config = manifest["config"]
                    add(Ref(config["digest"], config["size"], config["mediaType"], "config"))
            elif mediatypes.is_index(media_type):
                ref = Ref(entry["digest"], entry["size"], media_type, "index")
                child = load(ref, lambda doc, _type, what: check_index(doc, what))
                if child is not None:
                    visit(child, depth + 1)
            else:
                ref = Ref(entry["digest"], entry["size"], media_type, "blob")
            add(ref)

    visit(index, 1)
    return refs, docs


def is_json_type(media_type: str) -> bool:
    return media_type in mediatypes.CONFIG_TYPES or media_type.endswith("json")


