"""hash_range equals hashlib.sha256 of the bytes, whatever the holes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sifoverlay import ext3
from sifoverlay.errors import Ext3FormatError

MIB = 1 << 20


def reference(path: Path, offset: int, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return "sha256:" + hashlib.sha256(f.read(size)).hexdigest()


def sparse_file(path: Path, length: int, pieces: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(length)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


def data_extents(path: Path) -> int:
    """How many SEEK_DATA extents the file really has (proves the test file is sparse)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        count, pos, end = 0, 0, os.fstat(fd).st_size
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, pos, os.SEEK_HOLE)
            count += 1
        return count
    finally:
        os.close(fd)


@pytest.fixture
def holey(tmp_path: Path) -> Path:
    pieces = [
        (0, b"head"),
        (12345, os.urandom(7000)),
        (3 * MIB + 17, os.urandom(MIB + 333)),
        (9 * MIB - 5, b"straddles a MiB boundary"),
        (20 * MIB - 100, os.urandom(100)),
    ]
    path = sparse_file(tmp_path / "holey.bin", 20 * MIB, pieces)
    if data_extents(path) < 3:
        pytest.skip(f"{tmp_path} does not keep files sparse")
    return path


def test_whole_sparse_file(holey: Path) -> None:
    size = holey.stat().st_size
    assert ext3.hash_range(str(holey), 0, size) == reference(holey, 0, size)


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (1, 20 * MIB - 1),                 # unaligned start, to EOF
        (12345 + 100, 3 * MIB),           # starts inside data, ends inside data
        (5 * MIB + 1, 3 * MIB),           # entirely inside a hole
        (3 * MIB + 17 + 5, 6 * MIB - 13),  # ends mid-MiB, covers data-hole-data
        (777, 0),                          # empty range
    ],
)
def test_region_inside_bigger_file(holey: Path, offset: int, size: int) -> None:
    assert ext3.hash_range(str(holey), offset, size) == reference(holey, offset, size)


@pytest.mark.parametrize("buf", [4096, 65537, 4 * MIB])
def test_buffer_sizes_and_fd_input(holey: Path, buf: int) -> None:
    fd = os.open(holey, os.O_RDONLY)
    try:
        assert ext3.hash_range(fd, 999, 15 * MIB, buf=buf) == reference(holey, 999, 15 * MIB)
    finally:
        os.close(fd)


def test_dense_random_file(tmp_path: Path) -> None:
    path = tmp_path / "dense.bin"
    path.write_bytes(os.urandom(9 * MIB + 3))
    assert ext3.hash_range(str(path), 5, 9 * MIB - 2) == reference(path, 5, 9 * MIB - 2)


def test_progress_reports_monotonic_until_total(holey: Path) -> None:
    seen: list[tuple[int, int]] = []
    ext3.hash_range(str(holey), 10, 19 * MIB, progress=lambda d, t: seen.append((d, t)))
    assert {t for _, t in seen} == {19 * MIB}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == 19 * MIB and len(seen) >= 5


def test_range_past_end_of_file(holey: Path) -> None:
    with pytest.raises(Ext3FormatError, match=r"holey.bin: byte range \[1, 20971522\) runs past the end"):
        ext3.hash_range(str(holey), 1, 20 * MIB + 1)


def test_range_past_end_of_an_open_fd_names_the_file(holey: Path) -> None:
    fd = os.open(holey, os.O_RDONLY)
    try:
        with pytest.raises(Ext3FormatError, match=rf"^{holey}: byte range \[1, 20971522\) runs past the end"):
            ext3.hash_range(fd, 1, 20 * MIB + 1)
    finally:
        os.close(fd)


def test_image_made_by_mkfs(overlay_img: Path) -> None:
    assert ext3.hash_range(str(overlay_img), 0, 64 * MIB) == reference(overlay_img, 0, 64 * MIB)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.tuples(st.integers(0, 4 * MIB), st.integers(1, 200_000)), max_size=6),
    start=st.integers(0, 4 * MIB),
    length=st.integers(0, 4 * MIB),
    buf=st.sampled_from([4096, 100_003, 1 * MIB]),
)
def test_random_layouts(tmp_path: Path, pieces: list[tuple[int, int]], start: int, length: int, buf: int) -> None:
    path = sparse_file(tmp_path / "r.bin", 8 * MIB, [(off, os.urandom(n)) for off, n in pieces])
    assert ext3.hash_range(str(path), start, length, buf=buf) == reference(path, start, length)


def test_pipelined_read_ahead_equals_serial(tmp_path: Path) -> None:
    """Ranges of PIPELINE_MIN and more are read ahead by a thread: same digest, holes and
    short last pieces included, for a buffer size that is no divisor of anything."""
    from sifoverlay.ext3 import hashing

    size = hashing.PIPELINE_MIN + 7 * MIB
    pieces = [(0, os.urandom(5 * MIB + 1)), (9 * MIB, os.urandom(3)), (size - MIB - 9, os.urandom(MIB))]
    path = sparse_file(tmp_path / "big.bin", size + 11, pieces)
    assert data_extents(path) >= 2
    seen: list[int] = []
    digest = ext3.hash_range(str(path), 3, size, buf=100_003, progress=lambda d, t: seen.append(d))
    assert digest == reference(path, 3, size)
    assert seen == sorted(seen) and seen[-1] == size
    fd = os.open(path, os.O_RDONLY)
    try:
        serial = "sha256:" + hashlib.sha256(b"".join(
            bytes(view[:n]) if view is not None else bytes(n)
            for view, n in hashing._serial(fd, None, 3, 3 + size, 100_003))).hexdigest()
    finally:
        os.close(fd)
    assert serial == digest


def test_pipelined_reader_stops_when_the_consumer_raises(tmp_path: Path) -> None:
    """A progress callback that raises (the Epilog's hash deadline) ends the read-ahead
    thread before hash_range returns: the caller may close the fd at once."""
    import threading

    from sifoverlay.ext3 import hashing

    path = tmp_path / "dense.bin"
    path.write_bytes(os.urandom(hashing.PIPELINE_MIN + MIB))

    class Deadline(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done >= 2 * MIB:
            raise Deadline(done)

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(Deadline):
            ext3.hash_range(fd, 0, hashing.PIPELINE_MIN + MIB, buf=MIB, progress=stop_after_two)
        assert [t.name for t in threading.enumerate() if t.name == "sifoverlay-hash-reader"] == []
    finally:
        os.close(fd)


def test_pipelined_read_error_reaches_the_caller(tmp_path: Path) -> None:
    """The file shrinks under the read-ahead thread: the caller gets the same one-line
    Ext3FormatError as the serial path, and no thread is left behind."""
    import threading

    from sifoverlay.ext3 import hashing

    path = tmp_path / "shrinks.bin"
    path.write_bytes(os.urandom(hashing.PIPELINE_MIN + 2 * MIB))
    fd = os.open(path, os.O_RDONLY)

    def shrink_once(done: int, total: int) -> None:
        if done <= MIB:
            os.truncate(path, 4 * MIB)

    try:
        with pytest.raises(Ext3FormatError, match=r"unexpected end of file at byte 4194304 while hashing"):
            ext3.hash_range(fd, 0, hashing.PIPELINE_MIN + 2 * MIB, buf=MIB, progress=shrink_once)
        assert [t.name for t in threading.enumerate() if t.name == "sifoverlay-hash-reader"] == []
    finally:
        os.close(fd)
