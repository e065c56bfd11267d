"""ext3.resize._zero_bit_runs (compact's free-block reader) against a bit-by-bit reference."""

from __future__ import annotations

import random

from sifoverlay.ext3.resize import _zero_bit_runs


def _reference(bitmap: bytes, count: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i in range(count + 1):
        free = i < count and not bitmap[i >> 3] & (1 << (i & 7))
        if free and start is None:
            start = i
        elif not free and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_runs_match_the_bitwise_reference() -> None:
    rng = random.Random(18)
    for _ in range(2000):
        count = rng.randint(1, 300)
        bitmap = bytes(rng.choice([0, 0xFF, rng.randint(0, 255)]) for _ in range((count + 7) // 8))
        assert list(_zero_bit_runs(bitmap, count)) == _reference(bitmap, count), (count, bitmap.hex())


def test_known_bitmap() -> None:
    # blocks 0-2 used, 3-12 free, 13-15 used, 16-23 free (whole byte), 24 used
    bitmap = bytes([0b00000111, 0b11100000, 0x00, 0x01])
    assert list(_zero_bit_runs(bitmap, 25)) == [(3, 13), (16, 24)]
    assert list(_zero_bit_runs(bitmap, 20)) == [(3, 13), (16, 20)]  # bits past `count` are not blocks
