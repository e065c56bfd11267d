"""Fuzz: mutated vector files opened with SifFile (and, when present, the OCI-SIF model).

The only acceptable outcomes are success or a SifOverlayError whose message is one line
naming the file. Cases: FUZZ_EXAMPLES (default 2000; CI sets 100000). The number of
cases run is printed in the pytest summary and written to FUZZ_REPORT
(default /tmp/sifoverlay-fuzz-count.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sifoverlay.errors import SifOverlayError
from sifoverlay.sif import DataType, Layout, SifFile
from sifoverlay.sif import select as sel

from .support import FUZZ_COUNTS, sif_vectors, vector_id

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
REPORT = os.environ.get("FUZZ_REPORT", "/tmp/sifoverlay-fuzz-count.json")
READ_CAP = 1 << 20


class Vector:
    """A vector's bytes plus the offsets worth aiming at."""

    def __init__(self, name: str, raw: bytes) -> None:
        self.name = name
        self.raw = raw
        (self.total, self.table, _size, self.data_offset) = struct.unpack_from("<qqqq", raw, 88)
        self.slots = []  # (base offset, used, datatype, offset, size)
        for slot in range(self.total):
            base = self.table + slot * 585
            dtype, used = struct.unpack_from("<iB", raw, base)
            offset, size = struct.unpack_from("<qq", raw, base + 17)
            self.slots.append((base, used, dtype, offset, size))
        ends = [o + s for _, u, _, o, s in self.slots if u]
        self.boundaries = sorted({0, 1, 127, 128, self.table, self.table + 585, self.data_offset, len(raw), *ends})


VECTORS = [Vector(vector_id(p), p.read_bytes()) for p in sif_vectors()]

HEADER_FIELDS = (64, 72, 80, 88, 96, 104, 112, 120)
DESC_I64 = (17, 25, 33, 41, 49, 57, 65)
DESC_U32 = (5, 9, 13)
U32_SPECIALS = (0, 1, 2, 3, 0xF0000000, 0xF0000001, 0xFFFFFFFF)
DATATYPES = tuple(int(t) for t in DataType)

# Hypothesis draws one integer per case; vector, mutation count and the mutations
# themselves derive from it (random.Random(seed)). Drawing every field through Hypothesis
# cost ~2.4 ms per case, one draw ~0.4 ms, which is what makes 100 000 cases affordable in
# CI. A failure still reproduces (and shrinks) through the drawn integer.


def _value(rng: random.Random, v: Vector) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice((0, 1, -1, 2, 585, -585, 4096, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, -(1 << 63)))
    if pick < 0.8:
        return rng.choice(v.boundaries) + rng.randint(-3, 3)
    return rng.randint(-(1 << 63), (1 << 63) - 1)


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    if 0 <= offset and offset + struct.calcsize(fmt) <= len(data):
        struct.pack_into(fmt, data, offset, value)


def _header_field(rng: random.Random, v: Vector, data: bytearray) -> None:
    _put(data, rng.choice(HEADER_FIELDS), "<q", _value(rng, v))


def _slot(rng: random.Random, v: Vector) -> int:
    return v.table + rng.randint(0, max(v.total, 1)) * 585  # may point past the table


def _desc_field(rng: random.Random, v: Vector, data: bytearray) -> None:
    base = _slot(rng, v)
    choice = rng.randrange(4)
    if choice == 0:
        _put(data, base + rng.choice(DESC_I64), "<q", _value(rng, v))
    elif choice == 1:
        value = rng.choice(U32_SPECIALS) if rng.random() < 0.6 else rng.getrandbits(32)
        _put(data, base + rng.choice(DESC_U32), "<I", value)
    elif choice == 2:
        value = rng.choice(DATATYPES) if rng.random() < 0.7 else rng.randint(-(1 << 31), (1 << 31) - 1)
        _put(data, base, "<i", value)
    else:
        _put(data, base + 4, "<B", rng.randrange(256))


def _flip(rng: random.Random, v: Vector, data: bytearray) -> None:
    limit = len(data) if rng.random() < 0.3 else min(len(data), v.data_offset)
    if limit > 0:
        data[rng.randrange(limit)] ^= rng.randint(1, 255)


def _truncate(rng: random.Random, v: Vector, data: bytearray) -> None:
    cut = rng.choice(v.boundaries) + rng.randint(-2, 2) if rng.random() < 0.7 else rng.randint(0, len(data))
    del data[max(0, min(cut, len(data))) :]


def _random_bytes(rng: random.Random, v: Vector, data: bytearray) -> None:
    if data:
        at = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(min(len(data), v.data_offset))
        chunk = rng.randbytes(rng.randint(1, 64))
        data[at : at + len(chunk)] = chunk


def _rewrite_oci_object(rng: random.Random, v: Vector, data: bytearray) -> None:
    """Change an OCI object's bytes and keep its descriptor digest consistent, so the
    damage reaches the JSON / reference checks above the container layer."""
    oci = [s for s in v.slots if s[1] and s[2] in (DataType.OCI_BLOB, DataType.OCI_ROOT_INDEX) and s[4] <= READ_CAP]
    if not oci:
        return
    base, _, _, offset, size = rng.choice(oci)
    if offset + size > len(data) or base + 585 > len(data):
        return
    body = bytearray(data[offset : offset + size])
    if body:
        at = rng.randrange(len(body))
        if rng.random() < 0.5:  # JSON-ish damage: a structural character
            body[at] = ord(rng.choice('{}[]":,0-9a \\'))
        else:
            body[at : at + 8] = rng.randbytes(rng.randint(1, 8))[: len(body) - at]
    data[offset : offset + size] = body
    digest = b"sha256:" + hashlib.sha256(body).hexdigest().encode()
    data[base + 201 : base + 201 + 384] = digest.ljust(384, b"\0")


def _digest_text(rng: random.Random, v: Vector, data: bytearray) -> None:
    base = _slot(rng, v) + 201
    pick = rng.random()
    if pick < 0.3:  # a well-formed digest of something else
        text = b"sha256:" + hashlib.sha256(rng.randbytes(8)).hexdigest().encode()
    elif pick < 0.6:  # copy another slot's digest: duplicates
        other = _slot(rng, v) + 201
        text = bytes(data[other : other + 71])
    else:
        text = rng.randbytes(rng.randint(0, 80))
    if base + 384 <= len(data):
        data[base : base + 384] = text[:384].ljust(384, b"\0")


KINDS = (_header_field, _desc_field, _flip, _truncate, _random_bytes, _rewrite_oci_object, _digest_text)


def mutate(v: Vector, seed: int, count: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(v.raw)
    for _ in range(count):
        rng.choice(KINDS)(rng, v, data)
        if not data:
            break
    return bytes(data)


def _open_image_or_none() -> Callable[[SifFile], Any] | None:
    try:
        from sifoverlay.ocisif import open_image
    except Exception:  # the OCI layer may be absent or mid-edit
        return None
    return open_image  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def memfd() -> Iterator[int]:
    fd = os.memfd_create("sifoverlay-fuzz")
    yield fd
    os.close(fd)


def _check_error(exc: SifOverlayError, label: str) -> None:
    text = str(exc)
    assert "\n" not in text and text.startswith(f"{label}: "), text


def exercise(fd: int, label: str, data: bytes, open_image: Callable[[SifFile], Any] | None) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    FUZZ_COUNTS["sif"] += 1
    try:
        sif = SifFile.from_fd(os.dup(fd), label)
    except SifOverlayError as exc:
        _check_error(exc, label)
        return
    with sif:
        FUZZ_COUNTS["sif_accepted"] += 1
        # whatever we accept must be self-consistent
        assert Layout.from_file(sif).metadata_bytes() == data[: sif.header.data_offset]
        for desc in sif.used():
            desc.extra_info()
            if desc.size <= READ_CAP:
                assert sif.read(desc) == data[desc.offset : desc.end]
        try:
            sel.root_index(sif)
        except SifOverlayError as exc:
            _check_error(exc, label)
        if open_image is not None:
            FUZZ_COUNTS["ocisif"] += 1
            try:
                image = open_image(sif)
            except SifOverlayError as exc:
                _check_error(exc, label)
            else:
                FUZZ_COUNTS["ocisif_accepted"] += 1
                close = getattr(image, "close", None)
                if close is not None:
                    close()


def _write_report(seconds: float) -> None:
    payload = dict(FUZZ_COUNTS, seconds=round(seconds, 1), examples_setting=EXAMPLES)
    try:
        with open(REPORT, "w", encoding="utf-8") as out:
            json.dump(payload, out)
    except OSError:
        pass


def test_fuzz_mutated_vectors(memfd: int) -> None:
    open_image = _open_image_or_none()
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(st.integers(0, (1 << 64) - 1))
    def run(seed: int) -> None:
        v = VECTORS[seed % len(VECTORS)]
        exercise(memfd, f"fuzz/{v.name}", mutate(v, seed, 1 + (seed >> 32) % 4), open_image)

    try:
        run()
    finally:
        _write_report(time.monotonic() - started)
    assert FUZZ_COUNTS["sif"] >= EXAMPLES  # hypothesis really ran them all
    assert 0 < FUZZ_COUNTS["sif_accepted"] < FUZZ_COUNTS["sif"]  # both outcomes were reached


@pytest.mark.parametrize("name", [v.name for v in VECTORS])
def test_unmutated_vectors_accepted(memfd: int, name: str) -> None:
    v = next(v for v in VECTORS if v.name == name)
    before = FUZZ_COUNTS["sif_accepted"]
    exercise(memfd, f"fuzz/{name}", v.raw, None)
    assert FUZZ_COUNTS["sif_accepted"] == before + 1
