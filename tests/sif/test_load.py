"""SifFile.open: every vector parses and round-trips; every kind of damage is refused
with one SifFormatError line that names the file, and the file is left untouched."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from sifoverlay.errors import SifFormatError, SifOverlayError
from sifoverlay.sif import DESCRIPTOR_SIZE, DataType, Descriptor, SifFile

from tests.conftest import HAVE_VECTORS

from .support import (
    D_ID,
    D_OFFSET,
    D_SIZE,
    D_SWP,
    D_TYPE,
    D_USED,
    H_DATAOFF,
    H_DATASIZE,
    H_DOFF,
    H_DSIZE,
    H_FREE,
    H_TOTAL,
    desc_base,
    put_i64,
    put_u32,
    rows_from_sif,
    sif_vector_params,
    sif_vectors,
    siftool_rows,
    strip_type,
    vector_id,
)

VECTOR_FILES = sif_vectors()


def test_vector_inventory() -> None:
    # sylabs/sif images: 17 from Debian 12's golang-github-sylabs-sif-dev, 6 newer ones of the
    # conformance set (DSSE, PGP, OCI.Blob, OCI.RootIndex); + 2 singularity SIFs + 8 oci-tools goldens
    assert len(VECTOR_FILES) == (17 + 6 + 2 + 8 if HAVE_VECTORS else 17)


@pytest.mark.parametrize("path", sif_vector_params(), ids=vector_id)
def test_vector_parses_and_reserialises(path: Path) -> None:
    raw = path.read_bytes()
    with SifFile.open(path) as sif:
        h = sif.header
        meta = sif.metadata_bytes()
        assert meta == raw[: h.data_offset]
        rebuilt = bytearray(meta)
        rebuilt[:128] = h.pack()
        rebuilt[h.descriptors_offset : h.table_end] = b"".join(d.pack() for d in sif.descriptors)
        # rebuild from the decoded records only (the bytes in between are zero in every vector)
        from_records = bytearray(h.data_offset)
        from_records[:128] = h.pack()
        from_records[h.descriptors_offset : h.table_end] = b"".join(d.pack() for d in sif.descriptors)
        assert bytes(from_records) == raw[: h.data_offset]
        assert len(sif.descriptors) == h.descriptors_total
        assert h.descriptors_free == sum(not d.is_used for d in sif.descriptors)
        for desc in sif.used():
            data = b"".join(sif.iter_chunks(desc, chunk=1000))
            assert data == raw[desc.offset : desc.end]
            if desc.datatype in (DataType.OCI_BLOB, DataType.OCI_ROOT_INDEX):
                # every upstream OCI object carries the digest of its bytes
                assert desc.digest == "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("path", sif_vector_params(), ids=vector_id)
def test_siftool_lists_vector_like_us(siftool: str, path: Path) -> None:
    assert strip_type(siftool_rows(siftool, path)) == rows_from_sif(path)


def test_read_is_size_capped(vectors: Path) -> None:
    path = vectors / "sif/two-groups.sif"
    with SifFile.open(path) as sif:
        big = sif.by_id(3)
        assert big.size == 262144
        with pytest.raises(SifFormatError, match="read limit"):
            sif.read(big, limit=1000)
        assert len(sif.read(big)) == 262144


def test_from_fd_and_close(vectors: Path) -> None:
    path = vectors / "sif/one-object-oci-blob.sif"
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    sif = SifFile.from_fd(fd, path)
    assert sif.fd == fd and sif.stat.st_size == 33023
    assert sif.used()[0].digest == "sha256:a88b15e95042f7d5a1327c03c57e10bdc1cf5f5efc2968fc73c12b6f5b00c731"
    sif.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_missing_and_non_regular(tmp_path: Path) -> None:
    with pytest.raises(SifFormatError, match="cannot open"):
        SifFile.open(tmp_path / "nope.sif")
    with pytest.raises(SifFormatError, match="not a regular file"):
        SifFile.open(tmp_path)


# -- damage table -----------------------------------------------------------------------
Mutator = Callable[[bytearray], bytes]


def _truncate_to(n: int) -> Mutator:
    return lambda b: bytes(b[:n])


def _header(offset: int, value: int) -> Mutator:
    def mutate(b: bytearray) -> bytes:
        put_i64(b, offset, value)
        return bytes(b)

    return mutate


def _desc_i64(slot: int, field: int, value: int) -> Mutator:
    def mutate(b: bytearray) -> bytes:
        put_i64(b, desc_base(b, slot) + field, value)
        return bytes(b)

    return mutate


def _desc_u32(slot: int, field: int, value: int) -> Mutator:
    def mutate(b: bytearray) -> bytes:
        put_u32(b, desc_base(b, slot) + field, value)
        return bytes(b)

    return mutate


def _bytes_at(offset: int, data: bytes) -> Mutator:
    def mutate(b: bytearray) -> bytes:
        b[offset : offset + len(data)] = data
        return bytes(b)

    return mutate


def _second_root_index(b: bytearray) -> bytes:
    # turn the first blob of a 4-object OCI-SIF into an OCI root index
    struct.pack_into("<i", b, desc_base(b, 0) + D_TYPE, int(DataType.OCI_ROOT_INDEX))
    return bytes(b)


def _used_slot_without_id(b: bytearray) -> bytes:
    b[desc_base(b, 4) + D_USED] = 1
    return bytes(b)


def _used_slot_free_count_stale(b: bytearray) -> bytes:
    # a valid empty object in the spare slot, but DescriptorsFree still says 1
    base = desc_base(b, 4)
    b[base + D_USED] = 1
    put_u32(b, base + D_ID, 5)
    put_i64(b, base + D_OFFSET, 12553)
    return bytes(b)


BAD = "oci-sif/TestWrite/DockerManifest.golden"  # 4 objects, 4 slots, DataOffset 6436
BAD_SPARE = "oci-sif/TestWrite/SpareDescriptor.golden"  # 4 objects, 5 slots
CASES: list[tuple[str, str, Mutator, str]] = [
    ("empty-file", BAD, _truncate_to(0), "truncated: 0 bytes"),
    ("short-header", BAD, _truncate_to(100), "truncated: 100 bytes"),
    ("table-cut", BAD, _truncate_to(5000), "descriptor table .* extends past the end"),
    ("object-cut", BAD, _truncate_to(11968 - 1), r"data section \[6436, 11968\) extends past the end of the file \(11967 bytes\)"),
    ("bad-magic", BAD, _bytes_at(32, b"SIF_MAGIX"), "bad magic"),
    ("text-file", BAD, lambda b: b"hello world\n" * 20, "bad magic"),
    ("bad-version", BAD, _bytes_at(42, b"02"), "unsupported SIF version"),
    ("negative-total", BAD, _header(H_TOTAL, -1), "descriptors_total is negative"),
    ("negative-free", BAD, _header(H_FREE, -3), "descriptors_free is negative"),
    ("negative-data-size", BAD, _header(H_DATASIZE, -1), "data_size is negative"),
    ("huge-count", BAD, _header(H_TOTAL, 1 << 40), "implausible"),
    ("size-mismatch", BAD, _header(H_DSIZE, 4 * DESCRIPTOR_SIZE + 1), "descriptor table size"),
    ("table-past-end", BAD, _header(H_DOFF, 1 << 40), "extends past the end"),
    ("table-over-header", BAD, _header(H_DOFF, 64), "overlaps the header"),
    ("data-offset-in-table", BAD, _header(H_DATAOFF, 5000), "inside the descriptor table"),
    ("data-size-past-end", BAD, _header(H_DATASIZE, 1 << 30), "data section .* extends past the end"),
    ("data-size-short", BAD, _header(H_DATASIZE, 10), "ends before the furthest object"),
    ("free-lies-high", BAD, _header(H_FREE, 1), "header says 1 free descriptors but 0"),
    ("free-exceeds-total", BAD, _header(H_FREE, 9), "9 free descriptors claimed but only 4"),
    ("used-slot-no-id", BAD_SPARE, _used_slot_without_id, r"slot 4 has id 0, expected 5"),
    ("free-lies-used-slot", BAD_SPARE, _used_slot_free_count_stale, "header says 1 free descriptors but 0 slots are unused"),
    ("object-offset-past-end", BAD, _desc_i64(1, D_OFFSET, 1 << 40), "extends past the end"),
    ("object-before-data", BAD, _desc_i64(1, D_OFFSET, 100), "lies before the data section"),
    ("negative-object-size", BAD, _desc_i64(2, D_SIZE, -5), "negative offset/size"),
    ("negative-object-offset", BAD, _desc_i64(2, D_OFFSET, -5), "negative offset/size"),
    ("negative-padding", BAD, _desc_i64(2, D_SWP, -1), "negative offset/size"),
    ("overlap", BAD, _desc_i64(1, D_OFFSET, 6436 + 100), r"objects 1 .* and 2 .* overlap"),
    ("wrong-id", BAD, _desc_u32(2, D_ID, 7), "slot 2 has id 7, expected 3"),
    ("bad-digest", BAD, _bytes_at(4096 + 201, b"md5:zz"), "no valid sha256 digest"),
    ("two-root-indexes", BAD, _second_root_index, r"more than one OCI root index \(objects 1, 4\)"),
]


@pytest.mark.parametrize("vector,mutate,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_file_refused(vectors: Path, tmp_path: Path, vector: str, mutate: Mutator, expected: str) -> None:
    path = tmp_path / "damaged.sif"
    path.write_bytes(mutate(bytearray((vectors / vector).read_bytes())))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(SifFormatError) as info:
        SifFile.open(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert info.value.path == str(path)
    import re

    assert re.search(expected, message), message
    assert isinstance(info.value, SifOverlayError) and info.value.exit_code == 2
    # opening for write refuses too, and neither touched the bytes
    with pytest.raises(SifFormatError):
        SifFile.open(path, writable=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_unknown_datatype_tolerated(vectors: Path, tmp_path: Path) -> None:
    raw = bytearray((vectors / "sif/one-object-generic-json.sif").read_bytes())
    struct.pack_into("<i", raw, desc_base(raw, 0) + D_TYPE, 0x4FFF)
    path = tmp_path / "unknown.sif"
    path.write_bytes(raw)
    with SifFile.open(path) as sif:
        (desc,) = sif.used()
        assert desc.datatype == 0x4FFF and desc.datatype_enum is None
        assert desc.datatype_label == "Unknown" and desc.extra_info() == {} and desc.digest is None
        assert sif.read(desc) == b"{}"


def test_nonzero_used_byte_round_trips() -> None:
    raw = bytearray(Descriptor(used=1, id=1).pack())
    raw[D_USED] = 7  # Go reads any non-zero byte as true
    desc = Descriptor.unpack(raw)
    assert desc.is_used and desc.pack() == bytes(raw)
