"""overlay sync and status against real modifications: e2fsprogs writes, kernel rw mounts
(clean and crashed), raw writes, SingularityCE-made (fingerprint-less) overlays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.engine import lease
from sifoverlay.errors import ImageBusy
from sifoverlay.ocisif import OVERLAY_FINGERPRINT_ANNOTATION, open_image
from tests.conftest import require_root, require_tool
from tests.engine.conftest import (
    assert_consistent,
    debugfs_cat,
    kernel_rw_mount,
    modify_overlay,
    region,
    sh,
    sha256_range,
)


def test_sync_untouched_is_a_noop_without_hashing(overlay_image: Path) -> None:
    before = overlay_image.read_bytes()
    result = engine.sync(overlay_image)
    assert (result.action, result.bytes_hashed, result.replayed) == ("noop", 0, False)
    assert result.old_digest == result.new_digest
    assert overlay_image.read_bytes() == before


def test_sync_after_e2fsprogs_write_reconciles(overlay_image: Path, tmp_path: Path) -> None:
    offset, size = region(overlay_image)
    with open_image(overlay_image) as img:
        old = img.overlay.recorded_digest  # type: ignore[union-attr]
        old_small = [(d.offset, d.size) for d in (img.config.descriptor, img.manifest.descriptor, img.root_index.descriptor)]
    modify_overlay(overlay_image, tmp_path, b"payload one\n")
    assert engine.status(overlay_image).state == "modified"
    result = engine.sync(overlay_image)
    actual = sha256_range(overlay_image, offset, size)
    assert result.action == "reconciled"
    assert (result.old_digest, result.new_digest, result.bytes_hashed) == (old, actual, size)
    assert region(overlay_image) == (offset, size)
    assert_consistent(overlay_image)
    with open(overlay_image, "rb") as f:  # old config/manifest/index bytes are gone (punched)
        for start, length in old_small:
            f.seek(start)
            assert f.read(length) == bytes(length)
    assert debugfs_cat(overlay_image, "upper/hello") == b"payload one\n"
    status = engine.status(overlay_image, verify=True)
    assert (status.state, status.actual_digest, status.recorded_digest) == ("clean", actual, actual)
    again = engine.sync(overlay_image)
    assert (again.action, again.bytes_hashed) == ("noop", 0)


def test_sync_keeps_file_length_bounded_over_many_syncs(overlay_image: Path, tmp_path: Path) -> None:
    lengths = []
    for n in range(3):
        modify_overlay(overlay_image, tmp_path, f"round {n}\n".encode(), name=f"upper/f{n}")
        assert engine.sync(overlay_image).action == "reconciled"
        assert_consistent(overlay_image)
        lengths.append(os.path.getsize(overlay_image))
    growth = [b - a for a, b in zip(lengths, lengths[1:])]
    assert all(0 < g < 8192 for g in growth), growth  # only the small JSON blobs move


def test_status_states_and_raw_write_drift(overlay_image: Path) -> None:
    offset, size = region(overlay_image)
    st = engine.status(overlay_image)
    assert (st.state, st.actual_digest, st.overlay_size, st.journal_pending) == ("clean", None, size, 0)
    assert st.free_bytes > 50 << 20
    # a raw write that bypasses the filesystem: fingerprint unchanged, bytes changed
    with open(overlay_image, "r+b") as f:
        f.seek(offset + size - 4096)
        f.write(b"raw")
    assert engine.status(overlay_image).state == "clean"
    verified = engine.status(overlay_image, verify=True)
    assert verified.state == "drift"
    assert verified.actual_digest == sha256_range(overlay_image, offset, size) != verified.recorded_digest
    assert engine.sync(overlay_image).action == "noop"  # fingerprint path cannot see raw writes...
    forced = engine.sync(overlay_image, force_hash=True)  # ...a forced hash does
    assert forced.action == "reconciled" and forced.new_digest == verified.actual_digest
    assert engine.status(overlay_image, verify=True).state == "clean"


def _strip_fingerprint(image: Path) -> None:
    """What SingularityCE's own sync does to our annotation: drops it."""
    from sifoverlay.engine import plan
    from sifoverlay.engine.commit import commit
    from sifoverlay.engine.journal import Journal
    from sifoverlay.ocisif import jsonedit
    from sifoverlay.sif.load import SifFile

    with SifFile.open(image, writable=True) as sif:
        img = open_image(sif)
        manifest = jsonedit.replace_layer(img.manifest.json, -1, {"annotations": None})
        planned = plan._replace_image(img, op="sync", config=None, manifest=manifest, big=[])
        assert planned is not None
        commit(str(image), sif.fd, planned, Journal())


def test_fingerprintless_overlay_is_unknown_and_sync_refreshes_it(overlay_image: Path) -> None:
    _strip_fingerprint(overlay_image)
    with open_image(overlay_image) as img:
        assert img.overlay is not None and img.overlay.fingerprint is None
        digest = img.overlay.recorded_digest
    assert engine.status(overlay_image).state == "unknown"
    assert engine.status(overlay_image, verify=None).state == "clean"  # CLI default: hash when unknown
    result = engine.sync(overlay_image)
    assert (result.action, result.fingerprint_refreshed, result.new_digest) == ("noop", True, digest)
    with open_image(overlay_image) as img:
        layer = img.manifest.json["layers"][-1]
        assert json.loads(layer["annotations"][OVERLAY_FINGERPRINT_ANNOTATION])["state"] == 1
        assert img.overlay.recorded_digest == digest  # type: ignore[union-attr]
    assert_consistent(overlay_image)
    assert engine.status(overlay_image).state == "clean"
    assert engine.sync(overlay_image).bytes_hashed == 0


def test_sync_refuses_while_another_job_holds_the_lease(overlay_image: Path, tmp_path: Path) -> None:
    modify_overlay(overlay_image, tmp_path)
    holder = lease.Holder.current("job-77", "slurm")
    held = lease.acquire(overlay_image, holder)
    try:
        before = overlay_image.read_bytes()
        with pytest.raises(ImageBusy, match="job-77") as info:
            engine.sync(overlay_image)
        assert overlay_image.read_bytes() == before
        assert info.value.exit_code == 75
        assert engine.status(overlay_image).state == "in-use"
    finally:
        held.release()
    assert engine.sync(overlay_image).action == "reconciled"


def test_sync_inside_the_jobs_own_lease(overlay_image: Path, tmp_path: Path) -> None:
    """The Slurm epilog syncs for job J while J's lease (from the prolog) still exists."""
    modify_overlay(overlay_image, tmp_path)
    offset, size = region(overlay_image)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from sifoverlay.engine import lease; "
         f"l = lease.acquire({str(overlay_image)!r}, lease.Holder.current('job-5', 'slurm'), region=({offset}, {size})); "
         "print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        # the job's process still holds its OFD lock: refused, naming the job
        with pytest.raises(ImageBusy, match="job-5"):
            engine.sync(overlay_image, job="job-5")
    finally:
        child.communicate("\n", timeout=30)
    # the prolog process is gone (its byte-range lock with it), its lease file stays
    info = lease.inspect(overlay_image)
    assert info is not None and info.job_id == "job-5"
    with pytest.raises(ImageBusy, match="job-5"):
        engine.sync(overlay_image)  # anyone else is still refused
    result = engine.sync(overlay_image, job="job-5")
    assert result.action == "reconciled"
    assert_consistent(overlay_image)
    assert lease.inspect(overlay_image) is not None  # left for the epilog to release
    resumed = lease.resume(overlay_image, "job-5")
    assert resumed is not None and resumed.release()


@pytest.mark.root
def test_kernel_rw_mount_write_then_sync(overlay_image: Path, tmp_path: Path) -> None:
    require_root()
    offset, size = region(overlay_image)
    with kernel_rw_mount(overlay_image, tmp_path / "mnt") as (mnt, dev):
        (mnt / "upper" / "kernel.txt").write_text("via the kernel\n")
        # mounted rw: needs_recovery set, loop device attached -> in use, refused
        st = engine.status(overlay_image)
        assert st.state == "in-use" and dev in st.holder["detail"]  # type: ignore[index]
        with pytest.raises(ImageBusy, match="overlay in use"):
            engine.sync(overlay_image)
    result = engine.sync(overlay_image)
    assert result.action == "reconciled" and not result.replayed
    assert result.new_digest == sha256_range(overlay_image, offset, size)
    assert_consistent(overlay_image)
    assert debugfs_cat(overlay_image, "upper/kernel.txt") == b"via the kernel\n"


@pytest.mark.root
@pytest.mark.crash
def test_crash_copy_of_a_mounted_overlay_is_replayed_before_hashing(overlay_image: Path, tmp_path: Path) -> None:
    """A true crash image: copy the backing file while the kernel has it mounted rw
    (committed but unchecked-pointed ext3 journal); sync on the copy must replay the
    ext3 journal through a loop device first and end consistent."""
    require_root()
    require_tool("cp", "e2fsck")
    copy = tmp_path / "img" / "copy.sif"
    with kernel_rw_mount(overlay_image, tmp_path / "mnt") as (mnt, _dev):
        (mnt / "upper" / "crash").mkdir()
        (mnt / "upper" / "crash" / "data.bin").write_bytes(os.urandom(300_000))
        sh("sync", "-f", str(mnt / "upper" / "crash" / "data.bin"))
        time.sleep(0.2)
        sh("cp", "--sparse=always", str(overlay_image), str(copy))
        expected = (mnt / "upper" / "crash" / "data.bin").read_bytes()
    offset, size = region(copy)
    from sifoverlay.ext3 import Superblock

    assert Superblock.read(str(copy), offset).needs_recovery
    result = engine.sync(copy)
    assert result.action == "replayed-and-reconciled" and result.replayed
    sb = Superblock.read(str(copy), offset)
    assert not sb.is_dirty
    assert result.new_digest == sha256_range(copy, offset, size)
    assert_consistent(copy)
    assert debugfs_cat(copy, "upper/crash/data.bin") == expected
    assert engine.status(copy).state == "clean"
    assert engine.sync(copy).action == "noop"
    sh("e2fsck", "-fn", f"{copy}?offset={offset}")


def test_go_siftool_reads_and_extends_a_synced_image(overlay_image: Path, tmp_path: Path, siftool: str) -> None:
    """Interop with the Go reference library: it lists our objects at their offsets, dumps
    the root index we wrote, and its own add (which places by header DataSize in older
    versions) lands after our furthest object without overlapping anything."""
    modify_overlay(overlay_image, tmp_path)
    engine.sync(overlay_image)
    with open_image(overlay_image) as img:
        ext3_desc = img.overlay.descriptor  # type: ignore[union-attr]
        root = img.root_index
        end = max(d.end for d in img.sif.used())
    listing = sh(siftool, "list", str(overlay_image)).stdout
    assert f"{ext3_desc.id}    |1       |NONE    |{ext3_desc.offset}-{ext3_desc.end}" in listing
    dumped = subprocess.run([siftool, "dump", str(root.descriptor.id), str(overlay_image)], capture_output=True, check=True).stdout
    assert dumped == root.raw
    extra = tmp_path / "notes.txt"
    extra.write_bytes(b"generic object added by Go\n")
    sh(siftool, "add", "--datatype", "7", str(overlay_image), str(extra))
    from sifoverlay.sif.load import SifFile

    with SifFile.open(overlay_image) as sif:
        added = [d for d in sif.used() if d.datatype == 0x4007]
        assert len(added) == 1 and added[0].offset == end
    assert_consistent(overlay_image)
    assert engine.status(overlay_image).state == "clean"


def test_sync_refuses_a_path_swapped_since_it_was_authorized(overlay_image: Path, tmp_path: Path) -> None:
    """The Slurm Epilog passes the inode the Prolog authorized: if the path now names
    another image (rename swap), root must not rewrite it."""
    from sifoverlay.errors import NotAuthorized

    modify_overlay(overlay_image, tmp_path, b"swapped\n")
    st = os.stat(overlay_image)
    authorized = (st.st_dev, st.st_ino)
    swapped = overlay_image.with_name("other.oci.sif")
    swapped.write_bytes(overlay_image.read_bytes())
    os.rename(swapped, overlay_image)  # the path now names a different inode
    before = overlay_image.read_bytes()
    with pytest.raises(NotAuthorized, match="was replaced since it was authorized"):
        engine.sync(overlay_image, expect_identity=authorized)
    assert overlay_image.read_bytes() == before  # nothing written
    st = os.stat(overlay_image)
    result = engine.sync(overlay_image, expect_identity=(st.st_dev, st.st_ino))
    assert result.action == "reconciled"
    assert_consistent(overlay_image)
