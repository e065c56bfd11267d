"""Crash-at-every-write-point harness (crash-safety.md §3).

A *scenario* prepares a work directory (image + journal dir), then runs one operation
with an `io`. The harness:
  (a) in-process: for every op N, restore the pre-state, run with CountingIO(crash_at=N)
      (SimulatedCrash raised before op N executes), "kill" the process, recover, check;
      recovery itself is then cut at every one of its own write points (nested) and
      finished by a second recovery;
  (b) real process: the CLI verb with SIFOVERLAY_CRASH_AT=N, killed by SIGKILL;
  (c) power loss: replay the op log of an uninterrupted run onto the pre-state, up to
      op N, dropping writes/truncates/punches not followed by an fsync of that file and
      creations/renames/unlinks not followed by an fsync of their directory ("drop"), or
      applying everything but tearing the last unsynced pwrite in half ("torn").
After each crash: recover, then I1-I5 are asserted by `Checker`.

"Killing" the in-process writer = forgetting its open files and removing its lease
files: a real dead writer's lease becomes breakable once expired, which is engine.lease's
rule (tested there); the harness does not wait for expiry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sifoverlay.crashsim import durable_flags, open_fds, replay_op
from sifoverlay.fsio import CountingIO, FileIO, SimulatedCrash

TOTALS = {"points": 0, "old_or_new": 0, "nested": 0, "nested_ok": 0}


class RecordingIO(CountingIO):
    """CountingIO whose log also names the file behind every fd."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(crash_at, mode="raise", keep_log=True, name_fds=True)


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


def content_id(path: Path, offset: int = 0, size: int | None = None) -> str:
    """A fast fingerprint of the bytes of [offset, offset+size): equal iff the contents
    are equal (holes and explicit zeros alike), reading only data extents."""
    block = 4096
    h = hashlib.blake2b(digest_size=20)
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size if size is None else offset + size
        h.update(f"{end - offset}:".encode())
        pos = offset
        zero = bytes(block)
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            pos = data
            while pos < hole:
                chunk = os.pread(fd, min(1 << 20, hole - pos), pos)
                for i in range(0, len(chunk), block):
                    piece = chunk[i : i + block]
                    if piece != zero[: len(piece)]:
                        h.update((pos + i - offset).to_bytes(8, "little"))
                        h.update(piece)
                pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def sha_range(path: Path, offset: int, size: int) -> str:
    from sifoverlay.ext3 import hash_range

    return hash_range(str(path), offset, size)


@dataclass
class Scenario:
    """`run(image, journal_dir, io)` performs the operation; `cli` is its argv for (b)."""

    name: str
    work: Path
    run: Callable[[Path, Path, FileIO], object]
    cli: list[str]
    new_state: Callable[[Path, "Checker"], bool]
    image: Path = field(init=False)
    journal: Path = field(init=False)
    snapshot: Path = field(init=False)

    def __post_init__(self) -> None:
        self.image = self.work / "img" / "image.sif"
        self.journal = self.work / "journal"
        self.snapshot = self.work.parent / f"{self.work.name}.snapshot"

    def freeze(self) -> None:
        copy_tree(self.work, self.snapshot)

    def restore(self) -> None:
        copy_tree(self.snapshot, self.work)


def close_leaked_fds(before: set[int], under: Path) -> None:
    """A dead process's files close: drop fds (e.g. the lease's OFD lock) opened since
    `before` on files below `under`."""
    for fd in open_fds() - before:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)):
            os.close(fd)


def kill_writer(image: Path) -> None:
    """What a dead writer leaves that only expiry clears: its lease files."""
    prefix = f".{image.name}.sifoverlay-lease"
    for name in os.listdir(image.parent):
        if name.startswith(prefix):
            os.unlink(image.parent / name)


class Checker:
    """Invariants after recovery, against the pre-state captured at construction."""

    def __init__(self, scenario: Scenario) -> None:
        from sifoverlay.ocisif import open_image

        self.scenario = scenario
        image = scenario.image
        with open_image(image) as img:
            self.old_meta = img.sif.metadata_bytes()
            self.old_layers = [(layer.media_type, layer.digest, layer.size) for layer in img.layers]
            self.old_overlay = (img.overlay.offset, img.overlay.size) if img.overlay else None
        self.old_length = image.stat().st_size
        self.old_overlay_sha = sha_range(image, *self.old_overlay) if self.old_overlay else None
        self.old_overlay_id = content_id(image, *self.old_overlay) if self.old_overlay else None
        self.old_file_id = content_id(image)

    def state(self) -> str:
        """'old' | 'new'; AssertionError when the image is neither (or broken)."""
        from sifoverlay.ocisif import open_image
        from sifoverlay.ocisif.model import iter_refs

        image = self.scenario.image
        with open_image(image) as img:  # I1: loads, root index parses, graph resolves
            meta = img.sif.metadata_bytes()
            overlay = img.overlay
            for ref in iter_refs(img.sif):
                desc = img.blob(ref.digest)
                if overlay is not None and desc == overlay.descriptor:
                    continue  # the overlay digest is stale by design in the old state
                assert sha_range(image, desc.offset, desc.size) == ref.digest, f"blob {ref.digest} corrupt"
        if meta == self.old_meta:
            assert image.stat().st_size == self.old_length
            if self.old_overlay is not None:  # I3: the job's overlay bytes untouched
                assert content_id(image, *self.old_overlay) == self.old_overlay_id
            assert content_id(image) == self.old_file_id
            return "old"
        assert self.scenario.new_state(image, self), "image is neither the old nor the new state"
        return "new"

    def clean(self) -> None:
        """I5: no pending entry, no scratch or lease file left."""
        from sifoverlay.engine.journal import Journal

        assert Journal(self.scenario.journal).pending() == []
        if self.scenario.journal.exists():
            assert [n for n in os.listdir(self.scenario.journal) if n.endswith(".sovj")] == []
        extra = sorted(n for n in os.listdir(self.scenario.image.parent) if n != self.scenario.image.name)
        assert extra == [], extra

    def recover_and_check(self) -> str:
        """Recover twice (I4 idempotence), check I1-I3 and I5."""
        from sifoverlay import engine

        first = engine.recover([str(self.scenario.image)], journal_dir=self.scenario.journal)
        assert all(o.outcome != "failed" for o in first), first
        engine.recover(None, journal_dir=self.scenario.journal)
        state = self.state()
        digest = content_id(self.scenario.image)
        again = engine.recover([str(self.scenario.image)], journal_dir=self.scenario.journal)
        assert [o.outcome for o in again] == ["nothing"], again
        assert content_id(self.scenario.image) == digest
        self.clean()
        return state


def count_ops(scenario: Scenario) -> tuple[int, list[tuple[str, dict[str, object]]]]:
    scenario.restore()
    io = RecordingIO()
    scenario.run(scenario.image, scenario.journal, io)
    return io.count, io.log


def _checked(checker: Checker, *, nested: bool = False) -> str:
    """Count the point, recover + check it, count the success."""
    TOTALS["nested" if nested else "points"] += 1
    state = checker.recover_and_check()
    TOTALS["nested_ok" if nested else "old_or_new"] += 1
    return state


def in_process(
    scenario: Scenario, checker: Checker, total: int, *, nested: bool = True, log_ops: list[str] | None = None
) -> dict[str, int]:
    """(a): crash before every op 1..total; recovery nested-crashed at each of its ops."""
    from sifoverlay import engine
    from sifoverlay.engine.journal import Journal

    states = {"old": 0, "new": 0}
    nested_done: set[object] = set()
    for n in range(1, total + 1):
        scenario.restore()
        fds = open_fds()
        try:
            scenario.run(scenario.image, scenario.journal, CountingIO(n))
        except SimulatedCrash:
            pass
        else:
            raise AssertionError(f"{scenario.name}: op {n} of {total} did not crash")
        close_leaked_fds(fds, scenario.work)
        kill_writer(scenario.image)
        entries = Journal(scenario.journal).pending()
        # Nested: recovery cut at each of its own write points, once per distinct kind
        # of interrupted state (journal state x the kind of op that was cut).
        kind = (entries[0].state if entries else None, log_ops[n - 1] if log_ops else n)
        if nested and entries and kind not in nested_done:
            nested_done.add(kind)
            crashed_state = scenario.work.parent / f"{scenario.work.name}.crashed"
            copy_tree(scenario.work, crashed_state)
            rec = RecordingIO()
            engine.recover([str(scenario.image)], journal_dir=scenario.journal, io=rec)
            for m in range(1, rec.count + 1):
                copy_tree(crashed_state, scenario.work)
                fds = open_fds()
                try:
                    engine.recover([str(scenario.image)], journal_dir=scenario.journal, io=CountingIO(m))
                except SimulatedCrash:
                    pass
                close_leaked_fds(fds, scenario.work)
                kill_writer(scenario.image)
                _checked(checker, nested=True)
            copy_tree(crashed_state, scenario.work)
            shutil.rmtree(crashed_state)
        states[_checked(checker)] += 1
    return states


def real_process(scenario: Scenario, checker: Checker, points: list[int], repo: Path) -> dict[str, int]:
    """(b): the CLI verb SIGKILLed by itself at op N (SIFOVERLAY_CRASH_AT)."""
    states = {"old": 0, "new": 0}
    for n in points:
        scenario.restore()
        env = dict(os.environ, SIFOVERLAY_CRASH_AT=str(n))
        proc = subprocess.run(
            [sys.executable, "-m", "sifoverlay", *scenario.cli, "--journal-dir", str(scenario.journal), str(scenario.image)],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, (n, proc.returncode, proc.stderr[-2000:])
        kill_writer(scenario.image)
        from sifoverlay.engine.seal import sweep_dead_mounts

        time.sleep(0.05) if scenario.name == "seal" else None  # fuse2fs gets SIGTERM on our death
        for _ in range(100):
            if not sweep_dead_mounts() and not _live_seal_mounts():
                break
            time.sleep(0.05)
        states[_checked(checker)] += 1
    return states


def _live_seal_mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line for line in f if ".sifoverlay-seal-" in line]


def power_loss(scenario: Scenario, checker: Checker, log: list[tuple[str, dict[str, object]]], mode: str) -> dict[str, int]:
    """(c): the state a power cut before op N can leave, for every N."""
    states = {"old": 0, "new": 0}
    for n in range(1, len(log) + 1):
        scenario.restore()
        ops = log[: n - 1]
        durable = durable_flags(ops)
        unsynced_writes = [i for i, (op, _) in enumerate(ops) if op == "pwrite" and not durable[i]]
        tear = unsynced_writes[-1] if unsynced_writes else None
        root = str(scenario.work)
        for i, (op, info) in enumerate(ops):
            if mode == "drop" and not durable[i]:
                continue
            if not str(info.get("dst") or info.get("path") or "").startswith(root):
                continue  # scratch outside the image's tree (mkfs staging dir)
            replay_op(op, info, torn=(mode == "torn" and i == tear))
        kill_writer(scenario.image)
        states[_checked(checker)] += 1
    return states
