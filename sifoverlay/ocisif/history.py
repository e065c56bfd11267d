"""The image's revision history: one small JSON SIF object beside the OCI objects.

Why a separate SIF object (docs/format.md §8): SingularityCE finds its image through the
single `OCI.RootIndex` object and the `OCI.Blob` objects named by digest; an object of
another data type (`JSON.Generic`, 0x4006) is listed by `siftool` and ignored by
everything else. `singularity overlay sync` computes its digest over the ext3 range only
and deletes only OCI objects that its new index does not reference, so it neither sees
nor drops the history. Nothing in the manifest, config or index refers to it: every
digest SingularityCE computes is the same with or without it (OCI `config.history` is
not touched, so it stays consistent with `rootfs.diff_ids`).

The object has no group (signatures of group 1 do not cover it: it changes on every
commit), is linked to the object that holds the image's last layer, and is named
`HISTORY_NAME`. It is replaced (appended new, old one freed) by every commit, in the same
metadata write as the OCI objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sifoverlay.errors import OciFormatError
from sifoverlay.sif.constants import DataType
from sifoverlay.sif.descriptor import Descriptor
from sifoverlay.sif.load import SifFile

HISTORY_NAME: Final = "sifoverlay.history.json"
HISTORY_MEDIA_TYPE: Final = "application/vnd.sifoverlay.history.v1+json"
DEFAULT_CAP: Final = 1000
MAX_HISTORY_BYTES: Final = 8 << 20  # 1000 revisions are ~700 KiB; refuse absurd objects


@dataclass(frozen=True, slots=True)
class History:
    """Revisions, oldest first. `dropped`: how many older ones the cap removed; `lost`:
    why an unreadable history found in the image was started afresh (else None)."""

    revisions: tuple[dict[str, Any], ...] = ()
    dropped: int = 0
    lost: str | None = None
    descriptor: Descriptor | None = field(default=None, compare=False)

    @property
    def next_seq(self) -> int:
        return int(self.revisions[-1]["seq"]) + 1 if self.revisions else self.dropped + 1

    def appended(self, revision: Mapping[str, Any], *, cap: int = DEFAULT_CAP) -> History:
        """A copy with `revision` added under the next sequence number, oldest dropped
        beyond `cap`."""
        if cap < 1:
            raise ValueError(f"history cap must be at least 1, got {cap}")
        new = dict(revision, seq=self.next_seq)
        kept = (*self.revisions, new)
        extra = max(0, len(kept) - cap)
        return History(kept[extra:], self.dropped + extra, self.lost)

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"mediaType": HISTORY_MEDIA_TYPE, "dropped": self.dropped,
                               "revisions": list(self.revisions)}
        if self.lost is not None:
            doc["lost"] = self.lost
        return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode("ascii")

    def newest_first(self) -> list[dict[str, Any]]:
        return list(reversed(self.revisions))


def find_descriptor(sif: SifFile) -> Descriptor | None:
    """The history object: the first used JSON.Generic object named HISTORY_NAME."""
    for desc in sif.used():
        if desc.datatype == DataType.GENERIC_JSON and desc.name_str == HISTORY_NAME:
            return desc
    return None


def decode(raw: bytes, path: str | None = None) -> History:
    """Parse a history object; OciFormatError naming the problem when it is not one."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OciFormatError(path, f"revision history is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != HISTORY_MEDIA_TYPE:
        raise OciFormatError(path, "revision history object has the wrong media type")
    revisions = doc.get("revisions")
    dropped = doc.get("dropped", 0)
    if not isinstance(revisions, list) or not isinstance(dropped, int) or isinstance(dropped, bool) or dropped < 0:
        raise OciFormatError(path, "revision history: 'revisions' must be a list and 'dropped' a count")
    last = dropped
    for number, rev in enumerate(revisions):
        seq = rev.get("seq") if isinstance(rev, dict) else None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= last:
            raise OciFormatError(path, f"revision history: entry {number} has no increasing 'seq'")
        last = seq
    lost = doc.get("lost")
    return History(tuple(revisions), dropped, lost if isinstance(lost, str) else None)


def read(sif: SifFile) -> History:
    """The image's history (empty when it has none); OciFormatError when unreadable."""
    desc = find_descriptor(sif)
    if desc is None:
        return History()
    if desc.size > MAX_HISTORY_BYTES:
        raise OciFormatError(sif.path, f"revision history object is {desc.size} bytes, more than {MAX_HISTORY_BYTES}")
    found = decode(sif.read(desc, limit=MAX_HISTORY_BYTES), sif.path)
    return History(found.revisions, found.dropped, found.lost, desc)


def read_for_commit(sif: SifFile) -> History:
    """The history a commit extends: an unreadable one (the image is the user's) does not
    block the commit; it is replaced by a fresh history that says why."""
    try:
        return read(sif)
    except OciFormatError as exc:
        return History(lost=exc.problem, descriptor=find_descriptor(sif))
