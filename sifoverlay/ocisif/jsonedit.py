"""Minimal, order-preserving edits of OCI JSON (manifests, configs, indexes).

We never re-model OCI documents: a document is the dict `json.loads` gives (key order
kept), an edit deep-copies it and touches only the fields it names, so unknown fields,
annotations and platforms survive. `canonical()` serialises the way Go's encoding/json
does for these documents (compact, `<>&` and U+2028/U+2029 escaped, no newline), so a
re-serialised untouched ggcr document keeps its digest.

Numbers: OCI documents hold integers, which round-trip exactly; a float is re-emitted
with Python's shortest repr (Go may spell it differently).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from . import mediatypes

# Go escapes these inside strings even though JSON does not require it (HTML safety).
_GO_ESCAPES: Final = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE_RE: Final = re.compile("[<>&\u2028\u2029]")
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

# Field order of ggcr's v1.Descriptor, used when we build a descriptor from scratch.
DESCRIPTOR_KEYS: Final = ("mediaType", "size", "digest", "data", "urls", "annotations", "platform", "artifactType")

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")


class JsonError(ValueError):
    """The bytes are not the JSON document they should be (the caller adds the file name)."""


# Limits on crafted documents (every value of an OCI JSON document is attacker-chosen):
# Python refuses int() of more than 4300 digits with a bare ValueError, and deep nesting
# exhausts the stack of every recursive consumer (json.dumps, copy.deepcopy).
MAX_INT_DIGITS: Final = 4300
MAX_DEPTH: Final = 128


def _reject_constant(name: str) -> Any:
    raise JsonError(f"invalid JSON number {name}")


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise JsonError(f"not valid JSON (an integer of {digits} digits, the limit is {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_INT_DIGITS:
        raise JsonError(f"not valid JSON (a number of {len(text)} characters, the limit is {MAX_INT_DIGITS})")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonError(f"not valid JSON (number {text[:40]} is out of range)")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse(raw: bytes) -> Any:
    """Strict parse: UTF-8 only (no BOM), no NaN/Infinity or out-of-range numbers,
    integers of at most MAX_INT_DIGITS digits, at most MAX_DEPTH nested containers,
    nothing after the value. Every refusal is a JsonError (one line)."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise JsonError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise JsonError(f"not valid JSON (nested deeper than {MAX_DEPTH} levels)") from None
    except JsonError:
        raise
    except ValueError as exc:  # a conversion refused by the interpreter itself
        raise JsonError(f"not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise JsonError(f"not valid JSON (nested deeper than {MAX_DEPTH} levels)")
    return value


def canonical(obj: Any) -> bytes:
    """Compact JSON exactly like Go's json.Marshal for maps built from parsed documents."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group(0)], text)
    # Go replaces unpaired surrogates (only reachable through \ud8xx escapes) with U+FFFD.
    text = _SURROGATE_RE.sub("\ufffd", text)
    return text.encode("utf-8")


def digest_of(raw: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def make_descriptor(
    media_type: str,
    size: int,
    digest: str,
    *,
    annotations: Mapping[str, str] | None = None,
    platform: Mapping[str, Any] | None = None,
    artifact_type: str | None = None,
) -> dict[str, Any]:
    """A new OCI descriptor with keys in ggcr order (absent optional fields omitted)."""
    out: dict[str, Any] = {"mediaType": media_type, "size": int(size), "digest": digest}
    if annotations:
        out["annotations"] = dict(annotations)
    if platform:
        out["platform"] = dict(platform)
    if artifact_type:
        out["artifactType"] = artifact_type
    return out


def descriptor_of(raw: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    """Descriptor (mediaType, size, digest) of a serialised document."""
    return make_descriptor(media_type, len(raw), digest_of(raw), **extra)


def merge_descriptor(old: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`old` with `changes` applied: existing keys keep their position, new keys go where
    ggcr would put them, a change whose value is None removes the key."""
    merged = dict(copy.deepcopy(old))
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = copy.deepcopy(value)
    rank = {key: i for i, key in enumerate(DESCRIPTOR_KEYS)}
    added = [k for k in changes if k not in old and k in merged]
    if not added:
        return merged
    # Re-insert new keys after the last existing key that precedes them in ggcr order.
    result: dict[str, Any] = {}
    pending = sorted(added, key=lambda k: rank.get(k, len(rank)))
    for key, value in merged.items():
        if key in added:
            continue
        while pending and rank.get(pending[0], len(rank)) < rank.get(key, len(rank)):
            name = pending.pop(0)
            result[name] = merged[name]
        result[key] = value
    for name in pending:
        result[name] = merged[name]
    return result


# -- manifests --------------------------------------------------------------------------------
def _layers(manifest: dict[str, Any]) -> list[Any]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise JsonError("manifest has no layers list")
    return layers


def replace_layer(manifest: Mapping[str, Any], index: int, descriptor: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest with `layers[index]` updated by `descriptor` (merge: see merge_descriptor)."""
    out = copy.deepcopy(dict(manifest))
    layers = _layers(out)
    try:
        layers[index] = merge_descriptor(layers[index], descriptor)
    except IndexError:
        raise JsonError(f"manifest has no layer {index}") from None
    return out


def append_layer(manifest: Mapping[str, Any], descriptor: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(manifest))
    _layers(out).append(copy.deepcopy(dict(descriptor)))
    return out


def replace_config(manifest: Mapping[str, Any], descriptor: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest whose `config` descriptor is updated by `descriptor` (merge)."""
    out = copy.deepcopy(dict(manifest))
    old = out.get("config")
    if not isinstance(old, dict):
        raise JsonError("manifest has no config descriptor")
    out["config"] = merge_descriptor(old, descriptor)
    return out


# -- configs ----------------------------------------------------------------------------------
def _diff_ids(config: dict[str, Any], *, create: bool) -> list[Any]:
    rootfs = config.get("rootfs")
    if rootfs is None and create:
        rootfs = config["rootfs"] = {"type": "layers", "diff_ids": []}
    if not isinstance(rootfs, dict):
        raise JsonError("config has no rootfs object")
    diff_ids = rootfs.get("diff_ids")
    if diff_ids is None and create:
        diff_ids = rootfs["diff_ids"] = []
    if not isinstance(diff_ids, list):
        raise JsonError("config rootfs has no diff_ids list")
    return diff_ids


def set_diff_id(config: Mapping[str, Any], index: int, digest: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    diff_ids = _diff_ids(out, create=False)
    try:
        diff_ids[index] = digest
    except IndexError:
        raise JsonError(f"config has no diff_id {index}") from None
    return out


def append_diff_id(config: Mapping[str, Any], digest: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    _diff_ids(out, create=True).append(digest)
    return out


def append_history(config: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    history = out.setdefault("history", [])
    if not isinstance(history, list):
        raise JsonError("config history is not a list")
    history.append(copy.deepcopy(dict(entry)))
    return out


# -- indexes ----------------------------------------------------------------------------------
def replace_manifest_entry(
    index: Mapping[str, Any], entry: Mapping[str, Any], *, old_digest: str | None = None
) -> dict[str, Any]:
    """Index whose image entry is updated by `entry` (merge: platform, annotations and
    artifactType of the old entry are kept unless `entry` overrides them).

    The entry to update is the one whose digest is `old_digest`; without it, the single
    top-level image entry SingularityCE would select (JsonError if not exactly one).
    """
    from .graph import select_image_entries  # local: graph imports this module

    out = copy.deepcopy(dict(index))
    manifests = out.get("manifests")
    if not isinstance(manifests, list):
        raise JsonError("index has no manifests list")
    if old_digest is None:
        candidates = select_image_entries(out)
        if len(candidates) != 1:
            raise JsonError(f"index has {len(candidates)} selectable images, cannot tell which to replace")
        positions = [i for i, e in enumerate(manifests) if e is candidates[0]]
    else:
        positions = [i for i, e in enumerate(manifests) if isinstance(e, dict) and e.get("digest") == old_digest]
        if len(positions) != 1:
            raise JsonError(f"index has {len(positions)} entries with digest {old_digest}")
    manifests[positions[0]] = merge_descriptor(manifests[positions[0]], entry)
    return out


def new_index(entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    """An OCI image index like ggcr's empty.Index plus appended entries."""
    return {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [copy.deepcopy(dict(e)) for e in entries]}
