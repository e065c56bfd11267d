"""The verify pass hashes images on a bounded pool of threads (issue 17 item 4): the same
verdicts as one at a time, never more than `workers` images at once, one byte budget for
the whole pass, and a stop that ends every thread's queue."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.metrics import scan
from sifoverlay.metrics.scan import RateBudget, RateLimit, Scanner, VerifyStopped, run_verify_pass
from tests.metrics.conftest import clone, write_with_debugfs


@pytest.fixture
def modified_images(template_image: Path, tmp_path: Path) -> list[Path]:
    """Six verify candidates: three changed (drift when hashed), three without a recorded
    fingerprint (unknown; clean when hashed)."""
    from tests.metrics.test_scan import _strip_fingerprint

    images = [clone(template_image, tmp_path / "images" / f"i{n}.oci.sif") for n in range(6)]
    for n, image in enumerate(images[:3]):
        write_with_debugfs(image, tmp_path, name=f"upper/f{n}", content=bytes([n]) * 5000)
    for image in images[3:]:
        _strip_fingerprint(image)
    return images


def verdicts(images: list[Path], workers: int) -> tuple[int, dict[str, str], int]:
    scanner = Scanner([str(images[0].parent)])
    scanner.scan()
    assert sorted(scanner.verify_candidates()) == sorted(map(str, images))
    count = run_verify_pass(scanner, rate_bytes=None, stop=threading.Event(), workers=workers)
    return count, {r.image: r.state for r in scanner.scan().images}, scanner.verified_bytes


def test_pool_gives_the_serial_verdicts(modified_images: list[Path]) -> None:
    serial = verdicts(modified_images, workers=1)
    pooled = verdicts(modified_images, workers=3)
    assert serial == pooled
    count, states, hashed = pooled
    assert count == 6 and hashed == 6 * (64 << 20)
    assert [states[str(i)] for i in modified_images] == ["drift"] * 3 + ["clean"] * 3
    assert states == {str(i): engine.status(i, verify=True).state for i in modified_images}


def test_pool_is_bounded_and_really_concurrent(modified_images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers: two images are hashed at once (a barrier for two trips), never three."""
    real = scan.engine.status
    lock = threading.Lock()
    running, peak = [0], [0]
    both = threading.Barrier(2, timeout=60)

    def counting_status(*args: object, **kwargs: object) -> object:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            both.wait()  # BrokenBarrierError (a failed verify) unless two run at the same time
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(scan.engine, "status", counting_status)
    scanner = Scanner([str(modified_images[0].parent)])
    scanner.scan()
    errors: list[str] = []
    count = run_verify_pass(scanner, rate_bytes=None, stop=threading.Event(), workers=2,
                            on_error=lambda path, exc: errors.append(f"{path}: {exc!r}"))
    assert (count, errors, peak[0]) == (6, [], 2)


def test_default_workers_follow_the_cores() -> None:
    import os

    assert scan.verify_workers() == len(os.sched_getaffinity(0))


def test_workers_must_be_positive(modified_images: list[Path]) -> None:
    scanner = Scanner([str(modified_images[0].parent)])
    scanner.scan()
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        run_verify_pass(scanner, rate_bytes=None, stop=threading.Event(), workers=0)


def test_a_stop_ends_every_queue(modified_images: list[Path]) -> None:
    """The exporter stops during the first hash: no thread starts another image."""
    stop = threading.Event()
    scanner = Scanner([str(modified_images[0].parent)])
    scanner.scan()
    real = scanner.verify

    def verify_then_stop(path: str, *, rate: RateLimit | None = None) -> str | None:
        stop.set()
        return real(path, rate=rate)

    scanner.verify = verify_then_stop  # type: ignore[method-assign]
    assert run_verify_pass(scanner, rate_bytes=None, stop=stop, workers=3) == 0
    assert len(scanner.verify_candidates()) == 6  # nothing was verified


def test_budget_is_shared_by_the_limits() -> None:
    """Each RateLimit adds what it hashed since its last call to the one budget: the pass's
    rate counts every image's bytes (the wait is computed from the total)."""
    budget = RateBudget(None)
    first, second = RateLimit(None, budget=budget), RateLimit(None, budget=budget)
    first(100, 1000)
    second(50, 1000)
    first(300, 1000)
    assert (budget.done, first.done, second.done) == (350, 300, 50)
    slow = RateBudget(1.0)  # 1 byte/s: 10 bytes are ~10 s ahead of the clock
    assert slow.add(10) > 5.0
    stop = threading.Event()
    stop.set()
    with pytest.raises(VerifyStopped):
        RateLimit(1.0, stop, budget=slow)(10, 10)


def test_fuse_daemon_files_inside_fuse_mounts_are_never_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped FUSE daemon (a fenced job, a frozen node) hangs every stat() of a file in
    its mount: the scan reads such a file's mount id from fdinfo and leaves it alone, so
    one stopped daemon cannot stop the exporter. Files on other filesystems still count."""
    proc = tmp_path / "proc"
    daemon = proc / "4242"
    (daemon / "fd").mkdir(parents=True)
    (daemon / "fdinfo").mkdir()
    (daemon / "comm").write_text("fuse-overlayfs\n")
    (daemon / "mountinfo").write_text(
        "24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "77 24 0:60 / /run/x/layer.0 ro,nosuid shared:40 - fuse.squashfuse img.sif ro,user_id=0\n")
    image = tmp_path / "image.sif"
    image.write_bytes(b"x")
    (daemon / "fd" / "3").symlink_to(image)
    (daemon / "fdinfo" / "3").write_text("pos:\t0\nflags:\t0100000\nmnt_id:\t24\nino:\t5\n")
    (daemon / "fd" / "4").symlink_to(tmp_path / "inside-the-fuse-mount")
    (daemon / "fdinfo" / "4").write_text("pos:\t0\nflags:\t0200000\nmnt_id:\t77\nino:\t1\n")
    looked: list[str] = []
    real = scan._file_id

    def recording(path: str) -> tuple[int, int] | None:
        looked.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(scan, "_file_id", recording)
    st = image.stat()
    assert scan._fuse_daemon_files(str(proc)) == {(st.st_dev, st.st_ino)}
    assert looked == ["3"]
