#!/usr/bin/env python3
"""Measured comparison: SingularityCE's `overlay sync` sequence vs `engine.sync` + recover.

    .venv/bin/python bench/compare_sync.py [--speed-mib 256] [--repeat 3] [--json-out F]

SingularityCE is not installable here, so its sync is re-enacted step by step in Go's
order (ocisif-format.md §3.3 and §2.6) with our Go-compatible verbs:
  hash the ext3 range -> set_oci_digest(ext3 object) -> new config + manifest (last layer
  and diff_id replaced) -> update_root_index (delete+zero+compact old config/manifest/index,
  add config, add manifest, add root index). Go never calls fsync; neither does the
  re-enactment ("go"). A second variant keeps our verbs' fsyncs ("go+fsync") to show the
  order itself, not only the missing fsync, is what breaks images.

Both sequences start from the same real OCI-SIF (busybox vector imported, 64 MiB ext3
overlay, one file written into it with debugfs: a stale recorded digest). Each is cut at
every write point:
  * crash:      SimulatedCrash raised before op N (the process dies there);
  * power-drop: the op log of a full run replayed up to op N, dropping every write not
                followed by an fsync of its file (creations/renames: of their directory);
  * power-torn: the same with every write applied and the last unsynced write torn in half;
  * lost-one:   the run completed and reported success, then power failed and ONE
                unsynced write never reached the disk (one point per unsynced write).
After each cut our side runs `engine.recover` (as `sifoverlay recover` would); the Go side
gets nothing (SingularityCE has no recovery) and, separately, one re-run of its sync.
Every outcome is classified, with the independent checker of bench/soak.py (hashlib over
the bytes, struct-parsed SIF) plus `open_image`:
  old       metadata byte-identical to the start, every non-overlay digest matches;
  new       every digest resolves and matches its bytes, overlay included, one root index;
  refused   open_image raises (SingularityCE's loader fails the same ways: no root index,
            a digest that does not resolve);
  corrupt   opens, but a digest does not resolve/match or the SIF table is inconsistent.
Speed: sync of a modified overlay (ours, the Go order, hashlib alone over the same bytes)
and a no-op sync, medians of --repeat runs, with ratios. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import check_image  # noqa: E402  (independent checker, stdlib only)

from sifoverlay import engine  # noqa: E402
from sifoverlay.crashsim import durable_flags, open_fds, replay_op, restore_file  # noqa: E402
from sifoverlay.errors import SifOverlayError  # noqa: E402
from sifoverlay.ext3 import hash_range  # noqa: E402
from sifoverlay.fsio import CountingIO, FileIO, SimulatedCrash  # noqa: E402
from sifoverlay.ocisif import jsonedit, mediatypes, open_image  # noqa: E402
from sifoverlay.ocisif.build import update_root_index  # noqa: E402
from sifoverlay.ocisif.importer import import_image  # noqa: E402
from sifoverlay.sif.set import set_oci_digest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAYOUT_SCRIPT = REPO / "scripts" / "busybox-layout.py"  # Debian's busybox-static as an OCI layout
Op = tuple[str, dict[str, object]]


# -- the two sequences under test -------------------------------------------------------------
def go_order_sync(path: str, *, io: FileIO, durable: bool = False) -> str:
    """SingularityCE SyncOverlay (§3.3) in Go's order; returns "noop" or "synced"."""
    with open_image(path) as img:
        overlay = img.overlay
        if overlay is None:
            raise SystemExit(f"{path}: no overlay")
        new = hash_range(img.sif.fd, overlay.offset, overlay.size)
        if new == overlay.recorded_digest:
            return "noop"  # "OCI digest matches overlay, no update required."
        object_id = overlay.descriptor.id
        layer = jsonedit.make_descriptor(mediatypes.EXT3_LAYER, overlay.size, new)  # annotations dropped
        manifest = jsonedit.replace_layer(img.manifest.json, -1, layer)
        manifest["layers"][-1] = layer
        config_raw = jsonedit.canonical(jsonedit.set_diff_id(img.config.json, -1, new))
        manifest["config"] = dict(manifest["config"], size=len(config_raw), digest=jsonedit.digest_of(config_raw))
        manifest_raw = jsonedit.canonical(manifest)
        entry = jsonedit.descriptor_of(manifest_raw, img.manifest_entry.get("mediaType", mediatypes.OCI_MANIFEST))
        index = jsonedit.canonical(jsonedit.new_index([entry]))  # ReplaceImage(img, nil)
    set_oci_digest(path, object_id, new, durable=durable, io=io)  # step 5: first
    blobs = {jsonedit.digest_of(config_raw): config_raw, entry["digest"]: manifest_raw}
    update_root_index(path, index, blobs, io=io)  # step 7 = §2.6
    return "synced"


def ours_sync(path: str, journal: str, *, io: FileIO) -> str:
    return engine.sync(path, journal_dir=journal, io=io).action


# -- I/O: record every op with the file behind its fd; Go never fsyncs ------------------------
class RecordingIO(CountingIO):
    def __init__(self, crash_at: int | None = None, *, fsync: bool = True) -> None:
        super().__init__(crash_at, mode="raise", keep_log=True, name_fds=True)
        self.do_fsync = fsync

    def fsync(self, fd: int) -> None:
        if self.do_fsync:
            super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        if self.do_fsync:
            super().fsync_dir(path)


# -- one work tree: image + journal, restorable ------------------------------------------------
class Tree:
    def __init__(self, root: Path, source: Path) -> None:
        self.root = root
        self.snapshot = root.parent / f"{root.name}.snapshot"
        self.snapshot.mkdir(parents=True)
        shutil.copy2(source, self.snapshot / "image.oci.sif")
        (self.snapshot / "journal").mkdir()
        self.image = str(root / "image.oci.sif")
        self.journal = str(root / "journal")

    def restore(self) -> None:
        """Back to the snapshot, rewriting the image in place: its inode is its identity
        (lease and journal records in the state directory are keyed by it)."""
        image = Path(self.image)
        if self.root.exists():
            for entry in self.root.iterdir():
                if entry == image:
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            self.root.mkdir(parents=True)
        for entry in self.snapshot.iterdir():
            if entry.name == image.name:
                restore_file(str(entry), str(image))  # bytes, length and holes; same inode
            elif entry.is_dir():
                shutil.copytree(entry, self.root / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, self.root / entry.name)

    def kill_writer(self, fds_before: set[int]) -> None:
        """What a dead process leaves: its fds close; its lease files stay until they
        expire (removed here instead of waiting for the TTL)."""
        for fd in open_fds() - fds_before:
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(self.root)):
                    os.close(fd)
            except OSError:
                pass
        state = os.environ.get("SIFOVERLAY_STATE_DIR")
        for top in [self.root] + ([Path(state)] if state else []):
            for dirpath, _, names in os.walk(top):
                for name in names:
                    if "lease" in name:  # beside the image (old layout) or <state>/leases/
                        os.unlink(os.path.join(dirpath, name))


class Classifier:
    def __init__(self, tree: Tree) -> None:
        tree.restore()
        with open_image(tree.image) as img:
            self.old_meta = img.sif.metadata_bytes()
        self.old_length = os.path.getsize(tree.image)
        self.tree = tree

    def __call__(self) -> str:
        image = self.tree.image
        try:
            with open_image(image) as img:
                meta = img.sif.metadata_bytes()
        except SifOverlayError:
            return "refused"
        check = check_image(image)
        if meta == self.old_meta and os.path.getsize(image) == self.old_length:
            stale = f"object with digest {check['overlay_digest']} hashes to"
            rest = [p for p in check["problems"] if not p.startswith(stale)]
            return "old" if not rest else "corrupt"
        return "new" if check["ok"] else "corrupt"


def cut_points(tree: Tree, run: Callable[[FileIO], object], *, recover: bool, fsync: bool,
               rerun: Callable[[], object] | None) -> dict[str, Any]:
    classify = Classifier(tree)
    tree.restore()
    recorder = RecordingIO(fsync=fsync)
    run(recorder)
    log = recorder.log
    results: dict[str, Any] = {"write_ops": len(log), "uninterrupted": classify(),
                               "bytes_written_to_image": sum(int(info["length"]) for op, info in log  # type: ignore[call-overload]
                                                             if op == "pwrite" and info.get("path") == tree.image),
                               "fsyncs": sum(1 for op, _ in log if op in ("fsync", "fsync_dir"))}
    after_rerun: Counter[str] = Counter()

    def finish(counter: Counter[str]) -> None:
        if recover:
            outcomes = engine.recover([tree.image], journal_dir=tree.journal)
            if any(o.outcome == "failed" for o in outcomes):
                counter["recover_failed"] += 1
        state = classify()
        counter[state] += 1
        if rerun is not None and state in ("refused", "corrupt"):
            try:
                rerun()
            except (SifOverlayError, SystemExit):
                pass
            after_rerun[classify()] += 1

    crash: Counter[str] = Counter()
    for n in range(1, len(log) + 1):
        tree.restore()
        fds = open_fds()
        try:
            run(RecordingIO(n, fsync=fsync))
        except SimulatedCrash:
            pass
        tree.kill_writer(fds)
        finish(crash)
    results["crash"] = dict(crash)
    for mode in ("drop", "torn"):
        counter: Counter[str] = Counter()
        for n in range(1, len(log) + 2):  # n = len+1: power cut right after the run returned
            tree.restore()
            ops = log[: n - 1]
            durable = durable_flags(ops)
            unsynced = [i for i, (op, _) in enumerate(ops) if op == "pwrite" and not durable[i]]
            for i, (op, info) in enumerate(ops):
                if not str(info.get("dst") or info.get("path") or "").startswith(str(tree.root)):
                    continue  # scratch outside the tree (mkfs staging and the like)
                if mode == "drop" and not durable[i]:
                    continue
                replay_op(op, info, torn=bool(mode == "torn" and unsynced and i == unsynced[-1]))
            tree.kill_writer(open_fds())
            finish(counter)
        results[f"power_{mode}"] = dict(counter)
    lost: Counter[str] = Counter()
    durable = durable_flags(log)
    for skip in [i for i, (op, _) in enumerate(log) if op in ("pwrite", "truncate") and not durable[i]]:
        tree.restore()
        for i, (op, info) in enumerate(log):
            if i != skip and str(info.get("dst") or info.get("path") or "").startswith(str(tree.root)):
                replay_op(op, info)
        tree.kill_writer(open_fds())
        finish(lost)
    results["lost_one"] = dict(lost)
    total: Counter[str] = Counter()
    for key in ("crash", "power_drop", "power_torn", "lost_one"):
        total.update(results[key])
    results["total"] = dict(total)
    results["bad"] = total["refused"] + total["corrupt"]
    if rerun is not None:
        results["bad_then_rerun_sync"] = dict(after_rerun)
    return results


# -- fixtures --------------------------------------------------------------------------------
def make_modified_image(work: Path, name: str, *, size_mib: int, sparse: bool) -> Path:
    """busybox-static -> OCI layout -> OCI-SIF -> ext3 overlay -> one file written into upper/ (stale digest)."""
    image = work / name
    layout = work / f".{name}.layout"
    subprocess.run([sys.executable, str(LAYOUT_SCRIPT), str(layout)], check=True, capture_output=True)
    import_image(str(layout), str(image))
    shutil.rmtree(layout)
    engine.create_overlay(image, size_mib=size_mib, sparse=sparse, journal_dir=work / "journal-setup")
    write_into_overlay(image, work)
    return image


def write_into_overlay(image: Path, work: Path) -> None:
    with open_image(image) as img:
        assert img.overlay is not None
        offset = img.overlay.offset
    payload = work / "payload.txt"
    payload.write_bytes(os.urandom(48 << 10))  # 48 KiB: allocates blocks, changes the digest
    subprocess.run(["debugfs", "-w", "-R", f"write {payload} upper/result-{time.monotonic_ns()}.bin",
                    f"{image}?offset={offset}"], check=True, capture_output=True)


def interleaved_medians(prepare: Callable[[], str], actions: dict[str, Callable[[str], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each action; runs are interleaved (rotating order) so that
    noise from other processes on the machine hits every action alike."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    names = list(actions)
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            path = prepare()
            start = time.perf_counter()
            actions[name](path)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def hashlib_only(path: str) -> str:
    with open_image(path) as img:
        assert img.overlay is not None
        offset, size = img.overlay.offset, img.overlay.size
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, end = offset, offset + size
        while pos < end:
            n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
            h.update(view[:n])
            pos += n
    finally:
        os.close(fd)
    return h.hexdigest()


def speed(work: Path, size_mib: int, repeat: int) -> dict[str, Any]:
    base = make_modified_image(work, "speed-base.oci.sif", size_mib=size_mib, sparse=False)
    copy = work / "speed.oci.sif"
    journal = str(work / "journal-speed")

    def fresh() -> str:
        shutil.copyfile(base, copy)  # a full copy: the bytes are in the page cache for everyone
        os.sync()  # ...and written back: nobody's first fsync pays for flushing the copy
        return str(copy)

    plain = FileIO()
    plain.fsync = lambda fd: None  # type: ignore[method-assign]  # Go: no fsync
    out: dict[str, Any] = {"overlay_mib": size_mib, "repeat": repeat}
    out.update({f"{k}_s": v for k, v in interleaved_medians(fresh, {
        "hashlib": hashlib_only,
        "go_order": lambda p: go_order_sync(p, io=plain),
        "ours": lambda p: ours_sync(p, journal, io=FileIO()),
    }, repeat).items()})
    synced = fresh()
    ours_sync(synced, journal, io=FileIO())
    clean = str(work / "speed-clean.oci.sif")
    shutil.copyfile(copy, clean)
    out.update({f"noop_{k}_s": v for k, v in interleaved_medians(lambda: clean, {
        "ours": lambda p: ours_sync(p, journal, io=FileIO()),
        "go_order": lambda p: go_order_sync(p, io=plain),
    }, repeat).items()})
    for key in list(out):
        if key.endswith("_s"):
            out[key] = round(out[key], 4)
    out["ratio_ours_vs_hashlib"] = round(out["ours_s"] / out["hashlib_s"], 2)
    out["ratio_go_order_vs_hashlib"] = round(out["go_order_s"] / out["hashlib_s"], 2)
    out["ratio_ours_vs_go_order"] = round(out["ours_s"] / out["go_order_s"], 2)
    out["ratio_noop_go_order_vs_ours"] = round(out["noop_go_order_s"] / out["noop_ours_s"], 1)
    out["mb_per_s_ours"] = round(size_mib * 1.048576 / out["ours_s"], 1)
    out["mb_per_s_hashlib"] = round(size_mib * 1.048576 / out["hashlib_s"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed-mib", type=int, default=256, help="overlay size for the speed runs (allocated)")
    parser.add_argument("--repeat", type=int, default=3, help="speed runs per figure (median)")
    parser.add_argument("--no-speed", action="store_true", help="crash points only")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    for tool in ("debugfs", "mkfs.ext3", "e2fsck"):
        if shutil.which(tool) is None:
            print(f"compare_sync.py: {tool} is required (scripts/setup.sh)", file=sys.stderr)
            return 2
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="compare-sync-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    os.environ["SIFOVERLAY_STATE_DIR"] = str(work / "state")  # lease records of this run, never the host's
    try:
        source = make_modified_image(work, "start.oci.sif", size_mib=64, sparse=True)
        result: dict[str, Any] = {"image": "busybox-static layout imported, 64 MiB sparse ext3 overlay, 48 KiB file written"}
        for name, fsync in (("go", False), ("go+fsync", True)):
            tree = Tree(work / name.replace("+", "_"), source)
            result[name] = cut_points(
                tree, lambda io, t=tree, f=fsync: go_order_sync(t.image, io=io, durable=f), recover=False, fsync=fsync,
                rerun=lambda t=tree: go_order_sync(t.image, io=FileIO()))
        tree = Tree(work / "ours", source)
        result["ours"] = cut_points(tree, lambda io, t=tree: ours_sync(t.image, t.journal, io=io), recover=True,
                                    fsync=True, rerun=None)
        if not args.no_speed:
            result["speed"] = speed(work, args.speed_mib, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if result["ours"]["bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
