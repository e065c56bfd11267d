"""The scanner and collector on real images: states agree with engine.status, the cache
notices every change, hashing verifies under its rate limit, leases and journal entries
are counted, and the exposition passes promtool."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sifoverlay import engine
from sifoverlay.engine import lease
from sifoverlay.metrics import names
from sifoverlay.metrics.collector import OverlayCollector
from sifoverlay.metrics.scan import RateLimit, Scanner, discover
from tests.metrics.conftest import clone, promtool_check_metrics, write_with_debugfs


def _collect(scanner: Scanner) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(OverlayCollector(scanner, max_age=0))
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _state(got: dict, image: Path) -> str:  # type: ignore[type-arg]
    on = [s for s in names.STATES if got[("sifoverlay_overlay_state", (("image", str(image)), ("state", s)))] == 1]
    off = [s for s in names.STATES if got[("sifoverlay_overlay_state", (("image", str(image)), ("state", s)))] == 0]
    assert len(on) == 1 and len(off) == 4, (on, off)  # one-hot
    return on[0]


def test_clean_then_modified_then_drift_then_clean(image: Path, tmp_path: Path, journal_dir: Path) -> None:
    scanner = Scanner([str(image.parent)], journal_dir=str(journal_dir))
    got = _collect(scanner)
    assert _state(got, image) == engine.status(image).state == "clean"
    offset, size = engine.status(image).overlay_offset, engine.status(image).overlay_size
    assert got[("sifoverlay_overlay_size_bytes", (("image", str(image)),))] == size == 64 << 20
    assert got[("sifoverlay_overlay_free_bytes", (("image", str(image)),))] == engine.status(image).free_bytes
    assert got[("sifoverlay_overlay_last_reconcile_timestamp_seconds", (("image", str(image)),))] == os.stat(image).st_mtime
    assert got[("sifoverlay_exporter_images", (("result", "ok"),))] == 1
    assert scanner.verify_candidates() == []

    write_with_debugfs(image, tmp_path, content=b"x" * 100_000)
    got = _collect(scanner)
    assert _state(got, image) == engine.status(image).state == "modified"
    assert got[("sifoverlay_overlay_free_bytes", (("image", str(image)),))] == engine.status(image).free_bytes
    assert scanner.verify_candidates() == [str(image)]
    assert got[("sifoverlay_exporter_verify_queue_images", ())] == 1

    assert scanner.verify(str(image)) == "drift"
    assert scanner.verified_bytes == size
    got = _collect(scanner)
    assert _state(got, image) == "drift"
    assert got[("sifoverlay_hashed_bytes_total", (("source", "verify"),))] == size
    assert scanner.verify_candidates() == []
    assert offset > 0

    result = engine.sync(image)
    assert result.action == "reconciled"
    got = _collect(scanner)
    assert _state(got, image) == engine.status(image).state == "clean"
    assert got[("sifoverlay_overlay_last_reconcile_timestamp_seconds", (("image", str(image)),))] == os.stat(image).st_mtime


def test_verified_verdict_expires_when_the_overlay_changes_again(image: Path, tmp_path: Path) -> None:
    scanner = Scanner([str(image)])
    write_with_debugfs(image, tmp_path, name="upper/one")
    scanner.scan()
    assert scanner.verify(str(image)) == "drift"
    assert [r.state for r in scanner.scan().images] == ["drift"]
    write_with_debugfs(image, tmp_path, name="upper/two")
    assert [r.state for r in scanner.scan().images] == ["modified"]
    assert scanner.verify_candidates() == [str(image)]


def test_live_lease_is_in_use_and_stale_lease_is_counted(image: Path, template_image: Path, tmp_path: Path) -> None:
    other = clone(template_image, image.parent / "b.oci.sif")
    scanner = Scanner([str(image.parent)])
    held = lease.acquire(image, lease.Holder.current("4242", "test"))
    try:
        # A dead holder on this host whose lease expired long ago: stale, not in use.
        lease_file = Path(lease.lease_path(other))
        lease_file.write_text(json.dumps({
            "host": socket.gethostname(), "pid": 2**22 + 12345, "job_id": "77", "source": "test",
            "acquired": time.time() - 7200, "heartbeat": time.time() - 7200, "ttl": 60,
        }))
        got = _collect(scanner)
        assert _state(got, image) == engine.status(image).state == "in-use"
        assert _state(got, other) == engine.status(other).state == "clean"
        assert got[("sifoverlay_leases_held", ())] == 1
        assert got[("sifoverlay_leases_stale", ())] == 1
        assert lease.break_stale(other)
    finally:
        held.release()
    got = _collect(scanner)
    assert _state(got, image) == "clean"
    assert (got[("sifoverlay_leases_held", ())], got[("sifoverlay_leases_stale", ())]) == (0, 0)


def test_journal_entries_and_their_age(image: Path, journal_dir: Path) -> None:
    scanner = Scanner([str(image)], journal_dir=str(journal_dir))
    journal_dir.mkdir()
    entry = journal_dir / "0123456789abcdef.1700000000000-host-1-abcdef.sovj"
    entry.write_bytes(b"torn intent")  # a void entry still awaits recovery
    old = time.time() - 1200
    os.utime(entry, (old, old))
    got = _collect(scanner)
    assert got[("sifoverlay_journal_pending_entries", ())] == 1
    assert got[("sifoverlay_journal_oldest_entry_age_seconds", ())] == pytest.approx(1200, abs=5)
    entry.unlink()
    got = _collect(scanner)
    assert (got[("sifoverlay_journal_pending_entries", ())], got[("sifoverlay_journal_oldest_entry_age_seconds", ())]) == (0, 0)


def test_broken_and_vanished_images(image: Path, tmp_path: Path) -> None:
    bad = image.parent / "bad.sif"
    bad.write_bytes(b"not a sif at all" * 10)
    (image.parent / ".hidden.sif").write_bytes(b"")
    (image.parent / "notes.txt").write_text("ignored")
    assert discover([str(image.parent)]) == [str(image), str(bad)]
    scanner = Scanner([str(image.parent), str(tmp_path / "missing")])
    got = _collect(scanner)
    assert _state(got, bad) == "unknown"
    assert ("sifoverlay_overlay_size_bytes", (("image", str(bad)),)) not in got
    assert got[("sifoverlay_exporter_images", (("result", "error"),))] == 1
    assert got[("sifoverlay_exporter_images", (("result", "ok"),))] == 1
    bad.unlink()
    got = _collect(scanner)
    assert not [k for k in got if ("image", str(bad)) in k[1]]
    assert got[("sifoverlay_exporter_images", (("result", "error"),))] == 0


def test_rate_limit_holds_hashing_back(image: Path, tmp_path: Path) -> None:
    write_with_debugfs(image, tmp_path)
    scanner = Scanner([str(image)])
    scanner.scan()
    start = time.monotonic()
    assert scanner.verify(str(image), rate=RateLimit(128e6)) == "drift"
    took = time.monotonic() - start
    assert took >= (64 << 20) / 128e6 * 0.95  # a lower bound: it cannot be faster than the limit


def test_exposition_passes_promtool(image: Path, tmp_path: Path) -> None:
    clone(image, image.parent / "with space \"and quote\".oci.sif")
    registry = CollectorRegistry()
    registry.register(OverlayCollector(Scanner([str(image.parent)]), max_age=0))
    text = generate_latest(registry).decode()
    assert 'image="' + str(image.parent) + '/with space \\"and quote\\".oci.sif"' in text
    proc = promtool_check_metrics(text)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_names_follow_the_conventions() -> None:
    seen = set()
    for spec in names.ALL:
        assert spec.name.startswith("sifoverlay_") and spec.name not in seen
        seen.add(spec.name)
        assert not spec.name.endswith("_total"), spec.name  # the exposition adds it to counters
        assert spec.sample_name.endswith("_total") == (spec.type == names.COUNTER)
        assert "image" not in spec.labels or spec in (
            names.OVERLAY_STATE, names.OVERLAY_LAST_RECONCILE, names.OVERLAY_SIZE, names.OVERLAY_FREE,
            names.OVERLAY_FREE_INODES, names.SIF_FREE_DESCRIPTORS, names.IMAGE_REVISIONS)
        assert not {"job", "job_id", "user", "uid", "path"} & set(spec.labels)
        if "seconds" in spec.name or "bytes" in spec.name:
            assert spec.name.endswith(("_seconds", "_bytes")), spec.name
    assert names.BUILD_INFO.type == names.INFO


def _strip_fingerprint(image: Path) -> None:
    """Make the overlay look SingularityCE-synced: no fingerprint annotation (engine commit)."""
    from sifoverlay.engine import plan
    from sifoverlay.engine.commit import commit
    from sifoverlay.engine.journal import Journal
    from sifoverlay.ocisif import jsonedit, open_image
    from sifoverlay.sif.load import SifFile

    with SifFile.open(image, writable=True) as sif:
        img = open_image(sif)
        manifest = jsonedit.replace_layer(img.manifest.json, -1, {"annotations": None})
        planned = plan._replace_image(img, op="sync", config=None, manifest=manifest, big=[])
        assert planned is not None
        commit(str(image), sif.fd, planned, Journal())


def test_fingerprintless_overlay_is_unknown_until_verified(image: Path) -> None:
    _strip_fingerprint(image)
    scanner = Scanner([str(image)])
    got = _collect(scanner)
    assert _state(got, image) == engine.status(image).state == "unknown"
    assert ("sifoverlay_overlay_last_reconcile_timestamp_seconds", (("image", str(image)),)) not in got
    assert scanner.verify_candidates() == [str(image)]
    assert scanner.verify(str(image)) == "clean"
    got = _collect(scanner)
    assert _state(got, image) == "clean"
    assert got[("sifoverlay_overlay_last_reconcile_timestamp_seconds", (("image", str(image)),))] == os.stat(image).st_mtime


@pytest.mark.parametrize("relative", [False, True])
def test_rw_fuse_mount_is_in_use(image: Path, tmp_path: Path, relative: bool) -> None:
    from tests.metrics.conftest import fuse2fs_mounted

    scanner = Scanner([str(image.parent)])
    assert [r.state for r in scanner.scan().images] == ["clean"]
    # fuse2fs records its source as typed: relative to its cwd, unresolvable from ours.
    with fuse2fs_mounted(image, tmp_path / "mnt", source=image.name if relative else None):
        assert [r.state for r in scanner.scan().images] == [engine.status(image).state] == ["in-use"]
    assert [r.state for r in scanner.scan().images] == ["modified"]  # the rw mount moved the fingerprint


def test_one_crafted_image_never_stops_the_scan(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OCI-SIF whose config holds a 5000-digit integer, and an image whose reading
    raises something unforeseen: each is one error, the others are exported."""
    from sifoverlay.metrics import scan
    from tests.cli.test_cli_errors import HUGE_INT, crafted

    crafted_image = crafted(image.parent / "crafted.sif", config=b'{"os":"linux","x":' + HUGE_INT + b"}")
    odd = clone(image, image.parent / "odd.sif")
    good = clone(image, image.parent / "z.sif")
    real_open = scan.open_image

    def open_image(path: str) -> object:
        if path == str(odd):
            raise RuntimeError("an unforeseen bug")
        return real_open(path)

    monkeypatch.setattr(scan, "open_image", open_image)
    scanner = Scanner([str(image.parent)])
    snapshot = scanner.scan()
    assert [(r.image, r.state, r.error) for r in snapshot.images] == [
        (str(image), "clean", None), (str(crafted_image), "unknown", "OciFormatError"),
        (str(odd), "unknown", "RuntimeError"), (str(good), "clean", None)]
    got = _collect(scanner)
    assert got[("sifoverlay_exporter_images", (("result", "error"),))] == 2
    assert got[("sifoverlay_exporter_images", (("result", "ok"),))] == 2
    assert _state(got, good) == "clean" and _state(got, crafted_image) == "unknown"
