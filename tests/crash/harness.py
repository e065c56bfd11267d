"""Crash harness (crash-safety.md §3, issue 16): byte-exact judgement of every crash outcome.

A *scenario* is a frozen pre-state (a work tree: img/image.sif, journal/, state/) and one
operation `run(image, journal, io)`. `Scenario.prepare` runs it once uninterrupted in a
child process with a recording I/O (the op log, and a snapshot of every external tool's
effect) and keeps the complete old and the complete new image file; a second run that
substitutes the recorded tool effects must give the same new file byte for byte (the
operation is deterministic given its tools' output). Every crash outcome, after
`recover`, must then equal one of the *allowed* files exactly - length, bytes and the
SEEK_DATA/SEEK_HOLE map (`crashsim.file_id`): old, new, or a state the scenario names and
justifies (`Scenario.allow`) - and leave nothing behind in the work tree.

Per cut point N ("the process dies / the power fails before op N"):
  kill     a forked child runs the operation with CountingIO(crash_at=N, mode="kill"): a
           real SIGKILL of a separate process at that op (no `finally:` runs). What it
           leaves is asserted (only journal entries, lease records naming the dead pid,
           scratch files), then `recover` - with the clock moved past the lease expiry,
           the one thing a dead holder's lease waits for - must clean all of it;
  nested   the killed state's recovery is itself SIGKILLed (forked) at each of its own
           ops and recovered again: pairs N x M, no deduplication (sampled by `Plan`);
  power    crashsim models on the recorded log prefix: drop, keep, K x subset, K x
           torn-512, K x torn-4096 (seeded by CRASH_SEED; `Case.replay` prints the one
           command that replays a case). Every pid in the log is the dead reference child,
           as after a reboot. Distinct end states (hash of the whole work tree before
           recovery) are counted per model; a state already judged is not judged twice.

External tools are substituted in crash runs by their recorded effect (`HarnessIO`): the
run is deterministic and the tool's effect is one opaque op with crash points before and
after it. Killing the tools themselves: tests/crash/tools.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sifoverlay import crashsim
from sifoverlay.crashsim import apply_cut, file_id, open_fds, plan_cut, restore_file, snapshot_file, tree_state
from sifoverlay.fsio import CountingIO, FileIO, SimulatedCrash

BASE_SEED = int(os.environ.get("CRASH_SEED", "16"))
POWER_MODELS = ("drop", "keep", "subset", "torn-512", "torn-4096")
LEASE_CLOCK_JUMP = 7 * 24 * 3600.0  # past every ttl + grace: a dead holder's lease may be broken
JUDGE_CLOCK_JUMP = 4 * LEASE_CLOCK_JUMP  # the judge's recover: later still than a killed recoverer's clock

Op = tuple[str, dict[str, object]]


def new_totals() -> dict[str, object]:
    return {
        "cut_points": 0, "kill_points": 0, "nested_pairs": 0, "power_cases": 0, "tool_kills": 0,
        "old": 0, "new": 0, "named": 0, "failures": [],
        "states": {m: set() for m in POWER_MODELS},
    }


TOTALS: dict[str, object] = new_totals()


def totals_line(totals: dict[str, object] | None = None) -> str:
    """One line: cut points, real kills, nested pairs, power cases, distinct end states per
    model, outcomes, failures ('' when nothing ran)."""
    t = TOTALS if totals is None else totals
    if not t["cut_points"] and not t["tool_kills"]:
        return ""
    states = t["states"]
    per_model = ", ".join(f"{m} {len(states[m])}" for m in POWER_MODELS)  # type: ignore[index]
    return (f"crash: {t['cut_points']} cut points, {t['kill_points']} real-kill points, {t['nested_pairs']} nested pairs,"
            f" {t['tool_kills']} tool kills, {t['power_cases']} power-loss cases; distinct end states: {per_model};"
            f" outcomes old {t['old']} / new {t['new']} / named {t['named']}; failures {len(t['failures'])}"  # type: ignore[arg-type]
            f" (seed {BASE_SEED})")


def _bump(key: str, n: int = 1) -> None:
    TOTALS[key] = int(TOTALS[key]) + n  # type: ignore[call-overload]


# --- I/O -----------------------------------------------------------------------------------
class HarnessIO(CountingIO):
    """CountingIO (log with named files) whose external tools are either run and
    snapshotted (`tools=None`: recording) or replaced by a recorded effect."""

    def __init__(self, crash_at: int | None = None, mode: str = "raise", *, keep_log: bool = False,
                 tools: dict[int, tuple[dict[str, str | None], object]] | None = None, snapdir: Path | None = None) -> None:
        super().__init__(crash_at, mode=mode, keep_log=keep_log, name_fds=True)
        self.tools = tools
        self.snapdir = snapdir
        self.recorded: dict[int, tuple[dict[str, str | None], object]] = {}
        self.externals = 0

    def external(self, tool: str, paths, call):  # type: ignore[no-untyped-def, override]
        self._before("external", tool=tool, paths=tuple(paths))
        entry = self.log[-1][1] if self.keep_log else None
        self.externals += 1
        if self.tools is not None:  # the recorded effect, onto this run's paths (scratch names differ)
            recorded, result = self.tools[self.externals]
            snaps = dict(zip(paths, recorded.values()))
            for target, snap in snaps.items():
                restore_file(snap, target)
        else:
            result = call()
            assert self.snapdir is not None, "recording I/O needs a snapshot directory"
            snaps = {p: snapshot_file(p, str(self.snapdir / f"{tool}-{self.externals}-{i}")) for i, p in enumerate(paths)}
            self.recorded[self.externals] = (snaps, result)
        if entry is not None:
            entry["snapshot"] = snaps
        return result


# --- work trees ------------------------------------------------------------------------------
def base_dir() -> Path:
    """Crash work trees live on tmpfs when there is one (hundreds of runs, real fsyncs
    cost only time); /dev/shm is a root-owned sticky directory, acceptable to statedir."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="sifoverlay-crash-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def names(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out.add(rel + "/")
        out.update(os.path.join(rel, n) for n in filenames)
    return out


def copy_tree(src: Path, dst: Path, *, keep: Path | None = None) -> None:
    """Make `dst` equal `src`; the file `keep` (relative) is rewritten in place so its inode
    (the image's identity key in the state directory) never changes."""
    if dst.exists():
        for entry in sorted(dst.iterdir()):
            _remove_all_but(entry, dst / keep if keep else None)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target_dir = dst / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        shutil.copymode(dirpath, target_dir)
        for name in filenames:
            source, target = Path(dirpath) / name, target_dir / name
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
                continue
            restore_file(str(source), str(target))
            shutil.copymode(source, target)


def _remove_all_but(path: Path, keep: Path | None) -> None:
    if keep is not None and path == keep:
        return
    if path.is_dir() and not path.is_symlink():
        if keep is not None and keep.is_relative_to(path):
            for entry in path.iterdir():
                _remove_all_but(entry, keep)
            return
        shutil.rmtree(path)
    else:
        path.unlink()


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


def lease_records(work: Path) -> list[Path]:
    """Lease records and their temp/tomb files anywhere in the work tree (beside the image
    or in the state directory)."""
    return [Path(d) / n for d, _, files in os.walk(work) for n in files if "lease" in n]


def drop_leases(work: Path) -> None:
    """What expiry clears for an in-process 'dead' writer (the holder is this very
    process, so the stale rule can never apply): its lease records."""
    for path in lease_records(work):
        path.unlink()


@contextlib.contextmanager
def clock_advanced(seconds: float) -> Iterator[None]:
    """time.time() moved forward: every lease heartbeat is long expired."""
    real = time.time
    time.time = lambda: real() + seconds  # type: ignore[assignment]
    try:
        yield
    finally:
        time.time = real  # type: ignore[assignment]


def sweep_seal_mounts() -> None:
    from sifoverlay.engine.seal import MOUNT_PREFIX, sweep_dead_mounts

    for _ in range(200):
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            live = [line for line in f if MOUNT_PREFIX in line]
        if not sweep_dead_mounts() and not live:
            return
        time.sleep(0.05)
    raise AssertionError(f"seal mounts left behind: {live}")


# --- scenarios -------------------------------------------------------------------------------
@contextlib.contextmanager
def scenario_env(base: Path) -> Iterator[None]:
    """State and journal directories of every process inside the work tree; a fixed
    SOURCE_DATE_EPOCH, so the revision each commit records (engine.history) is the same in
    the reference run and in every crashed run (images are compared byte for byte)."""
    saved = {k: os.environ.get(k) for k in ("SIFOVERLAY_STATE_DIR", "SIFOVERLAY_JOURNAL_DIR", "SOURCE_DATE_EPOCH")}
    os.environ["SOURCE_DATE_EPOCH"] = "1764892800"
    os.environ["SIFOVERLAY_STATE_DIR"] = str(base / "work" / "state")
    os.environ["SIFOVERLAY_JOURNAL_DIR"] = str(base / "work" / "journal")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Case:
    scenario: str
    kind: str  # kill | nested | power
    point: int
    model: str = ""
    k: int = 0
    sub: int = 0  # nested: the recovery's cut point

    @property
    def ident(self) -> str:
        if self.kind == "nested":
            return f"nested:{self.point}:{self.sub}"
        if self.kind == "power":
            return f"power:{self.point}:{self.model}:{self.k}"
        if self.kind == "tool":
            return f"tool:{self.model}:{self.point}"
        return f"kill:{self.point}"

    def rng(self) -> random.Random:
        return random.Random(f"{BASE_SEED}:{self.scenario}:{self.ident}")

    def replay(self) -> str:
        return (f"CRASH_SEED={BASE_SEED} .venv/bin/python bench/crash_exhaustive.py "
                f"--scenario {self.scenario} --case {self.ident}")


@dataclass
class Scenario:
    """`build(work)` makes the pre-state; `run(image, journal, io)` is the operation."""

    name: str
    build: Callable[[Path], None]
    run: Callable[[Path, Path, FileIO], object]
    seal_mounts: bool = False
    work: Path = field(init=False)
    base: Path = field(init=False)
    log: list[Op] = field(init=False, default_factory=list)
    tools: dict[int, tuple[dict[str, str | None], object]] = field(init=False, default_factory=dict)
    allowed: dict[str, str] = field(init=False, default_factory=dict)  # file_id -> state name
    justified: dict[str, str] = field(init=False, default_factory=dict)  # named state -> why
    allowed_names: set[str] = field(init=False, default_factory=set)
    judged: dict[str, str] = field(init=False, default_factory=dict)  # tree state -> verdict

    @property
    def image(self) -> Path:
        return self.work / "img" / "image.sif"

    @property
    def journal(self) -> Path:
        return self.work / "journal"

    @property
    def total(self) -> int:
        return len(self.log)

    def prepare(self, base: Path) -> Scenario:
        self.base = base
        self.work = base / "work"
        for sub in ("img", "journal", "state"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.build(self.work)
        for path in lease_records(self.work):  # the pre-state's own leftovers are part of it
            path.unlink()
        self.snapshot = base / "pre"
        copy_tree(self.work, self.snapshot)
        (base / "tools").mkdir()
        self.old_id = file_id(str(self.image))
        self.allowed = {self.old_id: "old"}
        pre_dirs = {n for n in names(self.work) if n.endswith("/")}
        # the uninterrupted reference run, in a child process: every pid the log and the
        # files name (leases, scratch) is a dead one afterwards, as after a power cut
        self.log, self.tools = reference_run(self, base / "tools", base / "reference.pickle")
        self.new_id = file_id(str(self.image))
        self.new_copy = base / "new.sif"
        snapshot_file(str(self.image), str(self.new_copy))
        self.allowed_names = pre_dirs | names(self.work)
        self.allowed[self.new_id] = "new"
        assert self.new_id != self.old_id, f"{self.name}: the operation changed nothing"
        # deterministic given the tools' recorded output
        self.restore()
        again = HarnessIO(keep_log=True, tools=self.tools)
        self.run(self.image, self.journal, again)
        assert file_id(str(self.image)) == self.new_id, f"{self.name}: a second run gave another new file"
        assert [op for op, _ in again.log] == [op for op, _ in self.log]
        self.restore()
        return self

    def allow(self, ident: str, name: str, why: str) -> None:
        """A named, justified third end state (e.g. the dirty ext3 replayed, rest old)."""
        self.allowed.setdefault(ident, name)
        self.justified[name] = why

    def restore(self, src: Path | None = None) -> None:
        copy_tree(src or self.snapshot, self.work, keep=Path("img/image.sif"))

    def op_kinds(self) -> list[str]:
        return [op for op, _ in self.log]


# --- judging -----------------------------------------------------------------------------------
def _recover(s: Scenario, io: FileIO | None = None) -> list[object]:
    from sifoverlay import engine

    kw = {} if io is None else {"io": io}
    return list(engine.recover([str(s.image)], journal_dir=s.journal, **kw))  # type: ignore[arg-type]


def judge(s: Scenario, case: Case) -> str:
    """recover (twice: idempotent), then the image must be exactly an allowed file and
    nothing but allowed names may be left in the work tree."""
    if s.seal_mounts:
        sweep_seal_mounts()
    with clock_advanced(JUDGE_CLOCK_JUMP):
        first = _recover(s)
        assert all(getattr(o, "outcome") != "failed" for o in first), first
        again = _recover(s)
    assert [getattr(o, "outcome") for o in again] == ["nothing"], again
    ident = file_id(str(s.image))
    state = s.allowed.get(ident)
    assert state is not None, f"image is neither old nor new nor a named state (file id {ident})"
    left = names(s.work) - s.allowed_names
    assert not left, f"left behind after recover: {sorted(left)}"
    key = "old" if state == "old" else "new" if state == "new" else "named"
    _bump(key)
    return state


def run_case(s: Scenario, case: Case, body: Callable[[], str]) -> str:
    try:
        return body()
    except Exception as exc:  # noqa: BLE001 - collected, reported with its replay command
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        TOTALS["failures"].append(f"{s.name} {case.ident}: {detail[:600]}\n    replay: {case.replay()}")  # type: ignore[attr-defined]
        return "FAILED"


def reference_run(s: Scenario, snapdir: Path, out: Path) -> tuple[list[Op], dict[int, tuple[dict[str, str | None], object]]]:
    import pickle

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            rec = HarnessIO(keep_log=True, snapdir=snapdir)
            s.run(s.image, s.journal, rec)
            with open(out, "wb") as f:
                pickle.dump((rec.log, rec.recorded), f)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"{s.name}: the reference run failed (status {status:#x})"
    with open(out, "rb") as f:
        log, tools = pickle.load(f)
    out.unlink()
    return log, tools


def kill_at(s: Scenario, n: int, target: Callable[[FileIO], object]) -> int:
    """Fork; the child runs `target` with a killing CountingIO at op n; returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            target(HarnessIO(n, mode="kill", tools=s.tools))
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"op {n}: child was not killed (status {status:#x})")
    return pid


def check_kill_leftovers(s: Scenario, pid: int) -> dict[str, int]:
    """What a SIGKILLed writer leaves: only journal entries, lease records (naming the dead
    pid) and scratch files; nothing else."""
    left = sorted(names(s.work) - s.allowed_names)
    kinds = {"journal": 0, "lease": 0, "scratch": 0}
    for rel in left:
        base = os.path.basename(rel.rstrip("/"))
        if rel.endswith("/"):
            continue
        if base.endswith(".sovj"):
            kinds["journal"] += 1
        elif "lease" in base:
            kinds["lease"] += 1
            text = (s.work / rel).read_bytes()
            assert str(pid).encode() in text or str(pid) in base or not text, f"lease {rel} does not name the dead pid {pid}"
        elif "sifoverlay-tmp" in base or "/scratch/" in f"/{rel}" or base.startswith(".sifoverlay-"):
            kinds["scratch"] += 1
        else:
            raise AssertionError(f"a killed writer left an unexpected file {rel}")
    return kinds


def kill_point(s: Scenario, n: int, *, nested_fraction: float = 0.0, leftovers: dict[str, int] | None = None) -> None:
    """Real SIGKILL at op n, check its leftovers, recover, judge; before that, a
    `nested_fraction` sample of the recovery's own cut points (pairs n x m)."""
    case = Case(s.name, "kill", n)

    def body() -> str:
        s.restore()
        pid = kill_at(s, n, lambda io: s.run(s.image, s.journal, io))
        found = check_kill_leftovers(s, pid)
        if leftovers is not None:
            for k, v in found.items():
                leftovers[k] = leftovers.get(k, 0) + v
        if nested_fraction > 0:
            crashed = s.base / "crashed"
            copy_tree(s.work, crashed)
            count = recovery_ops(s, crashed)
            subs = sample(list(range(1, count + 1)), nested_fraction, random.Random(f"{BASE_SEED}:{s.name}:{n}:nested"))
            nested_pairs(s, n, crashed, subs)
            s.restore(crashed)
        return judge(s, case)

    _bump("kill_points")
    run_case(s, case, body)


def _recover_late(s: Scenario, io: FileIO) -> object:
    with clock_advanced(LEASE_CLOCK_JUMP):
        return _recover(s, io)


def recovery_ops(s: Scenario, crashed: Path) -> int:
    s.restore(crashed)
    rec = CountingIO()
    if s.seal_mounts:
        sweep_seal_mounts()
    with clock_advanced(LEASE_CLOCK_JUMP):
        _recover(s, rec)
    return rec.count


def nested_pairs(s: Scenario, n: int, crashed: Path, subs: list[int]) -> None:
    """The recovery of the state killed at op n, cut (in-process) at each op in `subs`,
    then recovered again and judged."""
    for m in subs:
        case = Case(s.name, "nested", n, sub=m)

        def body(m: int = m, case: Case = case) -> str:
            s.restore(crashed)
            if s.seal_mounts:
                sweep_seal_mounts()
            kill_at(s, m, lambda io: _recover_late(s, io))
            return judge(s, case)

        _bump("nested_pairs")
        run_case(s, case, body)


def power_point(s: Scenario, n: int, k: int, models: tuple[str, ...] = POWER_MODELS) -> None:
    """Power cut before op n (n = total+1: after the run returned): every model, K draws
    of the random ones."""
    us = crashsim.units(s.log[: n - 1])
    for model in models:
        for j in range(1 if model in ("drop", "keep") else k):
            case = Case(s.name, "power", n, model, j)

            def body(model: str = model, case: Case = case) -> str:
                s.restore()
                plan = plan_cut(us, model, case.rng())
                apply_cut(us, plan, under=str(s.work))
                state = tree_state([str(s.work)])
                TOTALS["states"][model].add(f"{s.name}:{state}")  # type: ignore[index]
                if state in s.judged:
                    return s.judged[state]
                verdict = judge(s, case)
                s.judged[state] = verdict
                return verdict

            _bump("power_cases")
            run_case(s, case, body)


def sample(items: list[int], fraction: float, rng: random.Random, *, keep: tuple[int, ...] = ()) -> list[int]:
    if fraction >= 1.0:
        return list(items)
    count = max(1, round(len(items) * fraction))
    chosen = set(rng.sample(items, min(count, len(items)))) | {i for i in keep if i in items}
    return sorted(chosen)


@dataclass
class Plan:
    """How much of a scenario to run (CI samples with a fixed seed; the bench runs all)."""

    kill_fraction: float = 1.0
    power_fraction: float = 1.0
    k: int = 3
    nested_fraction: float = 1.0  # of the recovery cut points, per kill point
    nested_points_fraction: float = 1.0  # of the kill points that get nested recovery cuts


def run_scenario(s: Scenario, plan: Plan) -> dict[str, object]:
    """Everything for one prepared scenario; returns its counts."""
    rng = random.Random(f"{BASE_SEED}:{s.name}:plan")
    total = s.total
    points = list(range(1, total + 1))
    kills = sample(points, plan.kill_fraction, rng, keep=(1, total))
    nested_at = set(sample(kills, plan.nested_points_fraction, rng))
    leftovers: dict[str, int] = {}
    _bump("cut_points", total)
    for n in kills:
        kill_point(s, n, nested_fraction=plan.nested_fraction if n in nested_at else 0.0, leftovers=leftovers)
    for n in sample(list(range(1, total + 2)), plan.power_fraction, rng, keep=(total + 1,)):
        power_point(s, n, plan.k)
    s.restore()
    return {"points": total, "kills": len(kills), "leftovers": leftovers}


def replay_case(s: Scenario, ident: str) -> str:
    """Run one case by its id (kill:N, nested:N:M, power:N:MODEL:K); raise on failure."""
    parts = ident.split(":")
    before = len(TOTALS["failures"])  # type: ignore[arg-type]
    if parts[0] == "kill":
        kill_point(s, int(parts[1]))
    elif parts[0] == "nested":
        n, m = int(parts[1]), int(parts[2])
        s.restore()
        kill_at(s, n, lambda io: s.run(s.image, s.journal, io))
        crashed = s.base / "crashed"
        copy_tree(s.work, crashed)
        nested_pairs(s, n, crashed, [m])
    else:
        n, model, k = int(parts[1]), parts[2], int(parts[3])
        us = crashsim.units(s.log[: n - 1])
        case = Case(s.name, "power", n, model, k)
        s.restore()
        plan = plan_cut(us, model, case.rng())
        print(f"plan: {crashsim.plan_key(plan)}")
        apply_cut(us, plan, under=str(s.work))
        run_case(s, case, lambda: judge(s, case))
    failures = TOTALS["failures"][before:]  # type: ignore[index]
    if failures:
        raise AssertionError("\n".join(failures))
    return "ok"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_id(path: Path, offset: int = 0, size: int | None = None) -> str:
    """Identity of the bytes of [offset, offset+size) (holes and zeros alike)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size if size is None else offset + size
        h.update(f"{end - offset}:".encode())
        f.seek(offset)
        left = end - offset
        while left > 0:
            chunk = f.read(min(left, 4 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sha_range(path: Path, offset: int, size: int) -> str:
    from sifoverlay.ext3 import hash_range

    return hash_range(str(path), offset, size)
