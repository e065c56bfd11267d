"""SIGKILL of the external tools themselves, in the middle of their work (issue 16 item 4):
strace's fault injection delivers SIGKILL to the tool on its N-th pwrite64 - e2fsck while
it replays the ext3 journal through the loop device, tar2sqfs while it writes the
squashfs - for N = 1..(writes of an uninterrupted run). The operation then fails with an
ordinary error (the engine's process lives); what must hold:

  * outside what the tool writes the image is byte-exactly old, nothing is left behind
    (no scratch, no lease, no journal entry, no mount), `recover` has nothing to do;
  * running the operation again completes, and ends byte-exactly where an uninterrupted
    run from that same state ends (tar2sqfs: the reference new file itself; e2fsck: the
    new file of a sync of the old image holding the same replayed ext3, whose region is
    the reference replay except one named field, s_wtime - e2fsck 1.47 stamps the wall
    clock there and ignores E2FSPROGS_FAKE_TIME for it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sifoverlay.crashsim import file_id, restore_file, snapshot_file
from sifoverlay.errors import ExternalToolError
from sifoverlay.fsio import REAL_IO
from tests.crash import harness

SB_WTIME = (1024 + 0x30, 4)  # ext2/3/4 superblock s_wtime: (offset in the fs, length)
WRAPPED_SYSCALL = "pwrite64"


def _real(tool: str) -> str:
    found = shutil.which(tool)
    assert found, f"{tool} not installed"
    return found


def _strace_argv(kill_at: int | None, log: Path | None, only: str | None = None) -> list[str]:
    argv = ["strace", "-f", "-qq", "-e", f"trace={WRAPPED_SYSCALL}", "-o", str(log) if log is not None else "/dev/null"]
    if only is not None:
        argv += ["-P", only]  # only calls on that file are traced (and counted for the injection)
    if kill_at is not None:
        argv += ["-e", f"inject={WRAPPED_SYSCALL}:signal=KILL:when={kill_at}"]
    return argv


def _wrapper(tool: str, real: str, kill_at: int | None, log: Path | None) -> Path:
    """A world-readable directory with an executable `tool` that runs `real` under strace
    (the fsck child runs unprivileged: it must be able to execute it and write the log)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sifoverlay-wrap-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    d.chmod(0o755)
    if log is not None:
        log.touch()
        log.chmod(0o666)
    script = d / tool
    # strace stats its program as the (unprivileged) caller; through /bin/sh the kernel's
    # own exec resolves the interpreter path, as it does without the wrapper
    script.write_text("#!/bin/sh\nexec " + " ".join(_strace_argv(kill_at, log))
                      + f" /bin/sh -c 'exec \"$0\" \"$@\"' {real} \"$@\"\n")
    script.chmod(0o755)
    return d


class wrapped:
    """Context: `tool` runs under strace (counting into `log`, or SIGKILLed at its
    `kill_at`-th pwrite64; strace counts per process). tar2sqfs is found through PATH, and
    e2fsck through the fixed PATH the fsck child gets (`ext3.tools.TOOL_PATH`): a wrapper
    directory goes first. `where="write-back"`: instead, strace (as root) is put in front
    of the fsck child's `setpriv` and sees only the child's pwrite64 calls into the image
    (-P): the write-back of the checked copy."""

    def __init__(self, tool: str, *, kill_at: int | None = None, log: Path | None = None,
                 where: str = "tool", image: str | None = None) -> None:
        self.tool, self.where, self.image = tool, where, image
        self.kill_at, self.log = kill_at, log
        self.dir: Path | None = None
        self.saved: object = None

    def __enter__(self) -> None:
        from sifoverlay.ext3 import fsck, tools

        if self.where == "write-back":
            self.saved = original = fsck.unprivileged_argv
            prefix = _strace_argv(self.kill_at, self.log, self.image)
            fsck.unprivileged_argv = lambda uid, gid: prefix + original(uid, gid)  # type: ignore[assignment]
            return
        self.dir = _wrapper(self.tool, _real(self.tool), self.kill_at, self.log)
        if self.tool == "e2fsck":
            self.saved = tools.TOOL_PATH
            tools.TOOL_PATH = f"{self.dir}:{tools.TOOL_PATH}"
        else:
            self.saved = os.environ["PATH"]
            os.environ["PATH"] = f"{self.dir}:{self.saved}"

    def __exit__(self, *exc: object) -> None:
        from sifoverlay.ext3 import fsck, tools

        if self.where == "write-back":
            fsck.unprivileged_argv = self.saved  # type: ignore[assignment]
            return
        if self.tool == "e2fsck":
            tools.TOOL_PATH = str(self.saved)
        else:
            os.environ["PATH"] = str(self.saved)
        shutil.rmtree(str(self.dir), ignore_errors=True)


def _count(s: harness.Scenario, tool: str, where: str) -> int:
    log = s.base / f"{tool}-{where}.strace"
    s.base.chmod(0o755)  # the unprivileged fsck child's strace writes the log there
    s.restore()
    with wrapped(tool, log=log, where=where, image=str(s.image)):
        s.run(s.image, s.journal, REAL_IO)
    s.restore()
    return sum(1 for line in log.read_text().splitlines() if f"{WRAPPED_SYSCALL}(" in line)


def count_writes(s: harness.Scenario, tool: str) -> list[tuple[str, int]]:
    """The kill points of `tool` in `s.run`: ("tool", n) for its n-th pwrite64 and, for
    e2fsck, ("write-back", k) for the fsck child's k-th pwrite64 into the image."""
    points = [("tool", n) for n in range(1, _count(s, tool, "tool") + 1)]
    if tool == "e2fsck":
        points += [("write-back", k) for k in range(1, _count(s, tool, "write-back") + 1)]
    return points


def _ranges_equal_outside(a: Path, b: Path, region: tuple[int, int]) -> bool:
    offset, size = region
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        if fa.read(offset) != fb.read(offset):
            return False
        fa.seek(offset + size)
        fb.seek(offset + size)
        return fa.read() == fb.read()


def kill_tool(s: harness.Scenario, tool: str, point: tuple[str, int], region: tuple[int, int] | None) -> str:
    """SIGKILL `tool` (or the fsck child's write-back) at its n-th write inside `s.run`;
    judge; returns how it ended."""
    where, n = point
    case = harness.Case(s.name, "tool", n, model=f"{tool}-{where}")

    def body() -> str:
        s.restore()
        old = s.base / "old.sif"
        snapshot_file(str(s.image), str(old))
        with wrapped(tool, kill_at=n, where=where, image=str(s.image)):
            try:
                s.run(s.image, s.journal, REAL_IO)
            except ExternalToolError as exc:
                assert tool in str(exc) or exc.data.get("tool") == tool, exc
            else:
                raise AssertionError(f"{tool} killed at write {n}, but the operation succeeded")
        if s.seal_mounts:
            harness.sweep_seal_mounts()
        left = harness.names(s.work) - s.allowed_names
        assert not left, f"a failed {tool} left {sorted(left)}"
        if region is None:
            assert file_id(str(s.image)) == s.old_id, "the image changed although only the scratch output was killed"
        else:
            assert _ranges_equal_outside(s.image, old, region), "bytes outside the ext3 region changed"
        outcomes = harness._recover(s)
        assert [getattr(o, "outcome") for o in outcomes] == ["nothing"], outcomes
        replayed = s.base / "replayed.sif"
        snapshot_file(str(s.image), str(replayed))
        s.run(s.image, s.journal, REAL_IO)  # again, with the real tool
        if region is None:
            assert file_id(str(s.image)) == s.new_id, "the re-run did not end at the reference new file"
            return "new"
        return _judge_replayed_sync(s, replayed, region)

    harness._bump("tool_kills")
    return harness.run_case(s, case, body)


def _judge_replayed_sync(s: harness.Scenario, replayed: Path, region: tuple[int, int]) -> str:
    """After a killed e2fsck: the final ext3 region = the reference replay except s_wtime,
    and the final file = an uninterrupted run of the same operation on (old image + that
    final region), byte for byte."""
    offset, size = region
    final = s.base / "final.sif"
    snapshot_file(str(s.image), str(final))
    snaps, _ = s.tools[1]
    reference_replay = next(iter(snaps.values()))
    assert reference_replay is not None
    with open(final, "rb") as f, open(reference_replay, "rb") as r:
        f.seek(offset)
        r.seek(offset)
        got, want = f.read(size), r.read(size)
    diffs = [i for i in range(0, size, 1 << 16) if got[i : i + (1 << 16)] != want[i : i + (1 << 16)]]
    named_lo, named_hi = SB_WTIME[0], SB_WTIME[0] + SB_WTIME[1]
    for block in diffs:
        lo = block
        hi = min(size, block + (1 << 16))
        changed = [i for i in range(lo, hi) if got[i] != want[i]]
        assert all(named_lo <= i < named_hi for i in changed), f"ext3 bytes differ outside s_wtime: {changed[:8]}"
    # the same operation, uninterrupted, on the old image carrying that final ext3 region
    s.restore()
    with open(s.image, "r+b") as img:
        img.seek(offset)
        img.write(got)
    s.run(s.image, s.journal, REAL_IO)
    # Bytes and length compared; the hole map is not: this expected file got its ext3
    # region by a plain write here (zeros as data), which no crash outcome can do.
    expected_objects = _objects_sans_replay_flag(s.image)
    restore_file(str(final), str(s.image))
    got_objects = _objects_sans_replay_flag(s.image)
    assert got_objects == expected_objects, "the re-run after a killed e2fsck is not the uninterrupted result"
    return "new"


def _objects_sans_replay_flag(path: Path) -> list[tuple[object, ...]]:
    """Every used SIF object (kind, id, links, name, bytes), in table order. The newest
    revision of the history object may differ in one known way: a re-run after a killed
    e2fsck that left the ext3 journal unreplayed replays it itself (detail.replayed),
    while the uninterrupted run got an already-replayed region (no such detail)."""
    from sifoverlay.ocisif import history
    from sifoverlay.sif.load import SifFile

    sif = SifFile.open(path)
    try:
        objects: list[tuple[object, ...]] = []
        for desc in sif.used():
            data = sif.read(desc, limit=desc.size)
            if desc.name_str == history.HISTORY_NAME:
                revisions = [dict(r) for r in history.decode(data).revisions]
                detail = dict(revisions[-1].pop("detail", {}))
                detail.pop("replayed", None)
                if detail:
                    revisions[-1]["detail"] = detail
                data = repr(revisions).encode()
            objects.append((desc.datatype, desc.id, desc.group_id, desc.linked_id, desc.name_str, data))
        return objects
    finally:
        sif.close()
