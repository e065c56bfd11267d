"""Find descriptors: by id, data type, group, OCI digest (sylabs/sif select.go rules).

Every function takes a SifFile, a Layout or a plain sequence of descriptors and looks
only at used slots. Lookups that must be unique raise when nothing or more than one
object matches, exactly where Go's GetDescriptor fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, Union

from ..errors import SifFormatError
from .constants import OCI_DATATYPES, DataType, PartType
from .descriptor import Descriptor


class ObjectNotFound(SifFormatError):
    """No used descriptor matches the selection."""


class MultipleObjectsFound(SifFormatError):
    """More than one descriptor matches a selection that must be unique."""


class _HasDescriptors(Protocol):
    path: str | None

    @property
    def descriptors(self) -> list[Descriptor]: ...


Source = Union[_HasDescriptors, Sequence[Descriptor]]


def _used(source: Source) -> tuple[list[Descriptor], str | None]:
    if isinstance(source, Sequence):
        return [d for d in source if d.is_used], None
    return [d for d in source.descriptors if d.is_used], source.path


def _exactly_one(matches: list[Descriptor], path: str | None, what: str) -> Descriptor:
    if not matches:
        raise ObjectNotFound(path, f"no object with {what}")
    if len(matches) > 1:
        ids = ", ".join(str(d.id) for d in matches)
        raise MultipleObjectsFound(path, f"more than one object with {what} (objects {ids})")
    return matches[0]


def by_id(source: Source, object_id: int) -> Descriptor:
    used, path = _used(source)
    return _exactly_one([d for d in used if d.id == object_id], path, f"id {object_id}")


def all_of_type(source: Source, datatype: int) -> list[Descriptor]:
    used, _ = _used(source)
    return [d for d in used if d.datatype == datatype]


def one_of_type(source: Source, datatype: int) -> Descriptor:
    used, path = _used(source)
    try:
        label = DataType(datatype).label
    except ValueError:
        label = f"{datatype:#x}"
    return _exactly_one([d for d in used if d.datatype == datatype], path, f"data type {label}")


def in_group(source: Source, group: int) -> list[Descriptor]:
    """Objects whose (masked) group id is `group`; 0 selects objects in no group."""
    used, _ = _used(source)
    return [d for d in used if d.group == group]


def groups(source: Source) -> list[int]:
    """Distinct non-zero group ids, ascending."""
    used, _ = _used(source)
    return sorted({d.group for d in used if d.group})


def linked_to(source: Source, target: int, *, group: bool = False) -> list[Descriptor]:
    """Objects linked to object `target` (or, with group=True, to group `target`)."""
    used, _ = _used(source)
    return [d for d in used if d.linked_id and d.link == target and d.is_group_link == group]


def by_oci_digest(source: Source, digest: str) -> Descriptor:
    """The OCI blob or root index whose Extra digest is `digest` (must be unique)."""
    used, path = _used(source)
    return _exactly_one(
        [d for d in used if d.datatype in OCI_DATATYPES and d.digest == digest], path, f"OCI digest {digest}"
    )


def root_index(source: Source) -> Descriptor:
    return one_of_type(source, DataType.OCI_ROOT_INDEX)


def primary_partition(source: Source) -> Descriptor:
    used, path = _used(source)
    return _exactly_one([d for d in used if d.is_primary_partition], path, f"partition type {PartType.PRIMSYS.name}")


def partitions(source: Source, part_type: int | None = None) -> list[Descriptor]:
    used, _ = _used(source)
    parts = [d for d in used if d.datatype == DataType.PARTITION]
    return parts if part_type is None else [d for d in parts if d.partition()[1] == part_type]


def duplicate_digests(descriptors: Iterable[Descriptor]) -> dict[str, list[int]]:
    """OCI digests carried by more than one used object -> their ids."""
    seen: dict[str, list[int]] = {}
    for d in descriptors:
        if d.is_used and d.digest is not None:
            seen.setdefault(d.digest, []).append(d.id)
    return {k: v for k, v in seen.items() if len(v) > 1}
