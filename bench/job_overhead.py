#!/usr/bin/env python3
"""Job start and end overhead of --oci-sif-overlay against plain jobs (issue 17 item 1).
Prints a table; asserts nothing. Needs root and a running dev cluster
(`slurm_plugin/dev-cluster up`, under the Slurm lock); creates the job user `sifo-bench`
if missing. A job that fails ends the rounds: the table then covers the complete rounds.

Kinds, --runs jobs each (default 20), interleaved round by round, each submitted when the
node is idle:

  plain    srun sh -c 'cat /proc/uptime; echo $SLURM_JOB_ID'
  ro       the same with --oci-sif-overlay=IMG:ro
  rw       the same with :rw, writing nothing (untouched overlay)
  rw-1     :rw, writing 1 MiB into the overlay
  rw-1024  :rw, writing 1024 MiB
  rw-8g    :rw on an image with an 8 GiB overlay, writing 1 MiB (the async job end: the node
           is idle before the whole 8 GiB is hashed; only with --kinds ...,rw-8g)
  ro-inline, rw-inline
           ro and rw with plugstack prolog_mounts=inline for that job (the Prolog mounts
           before it exits; the default, detached, exits once the lease is held and its
           child mounts while the job starts): the plugstack line is rewritten around each
           such job and restored (only with --kinds ...,ro-inline,rw-inline)

Each job prints the boot-clock time (/proc/uptime, the same clock inside the container:
no time namespace on the single-node cluster) when its command starts and, for the
writers, when it is done. Per job:

  submit-to-start  uptime at the command's start - client boot clock before `srun`;
  start-to-end     client boot clock when `srun` returned - the command's last uptime;
  end-to-idle      `srun` returned -> the job no longer COMPLETING (its Epilog done;
                   squeue polled every --poll s).
  end-to-clean     `srun` returned -> the job's end is over (no reconcile worker holds its
                   job-end lock: the image is committed and clean; slurm/endlock.py).

The Prolog/Epilog/worker phase breakdown comes from the hooks' own timing records
(timing.jsonl beside the Slurm log, slurm/phases.py): medians per kind. With
epilog_reconcile=async (the default) a rw job's hash and commit are in the worker's record.

The table gives medians and their difference to `plain` from the same run; "slow starts"
counts the jobs of a kind that started more than 0.5 s after plain's median. --load N runs
N busy loops meanwhile (the 2-core CI machine is rarely idle). Targets (issue
17): ro and rw (untouched) add <= 0.5 s to start and <= 0.3 s to end (start-to-end +
end-to-idle). /proc/uptime has 10 ms resolution.

    .venv/bin/python bench/job_overhead.py [--runs 20] [--kinds plain,ro,rw,rw-1,rw-1024] [--load N] [--keep]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

USER = "sifo-bench"  # not a tests/slurm user: a test's settle() cancels every job of those
USER_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]
PROBE = "cat /proc/uptime; echo job=$SLURM_JOB_ID"
WRITE = "cat /proc/uptime; echo job=$SLURM_JOB_ID; head -c {n} /dev/zero > /bench.bin; cat /proc/uptime"
KINDS = {
    "plain": (None, PROBE),
    "ro": ("ro", PROBE),
    "rw": ("rw", PROBE),
    "rw-1": ("rw", WRITE.format(n=1 << 20)),
    "rw-1024": ("rw", WRITE.format(n=1 << 30)),
    "rw-8g": ("rw", WRITE.format(n=1 << 20)),
    "ro-inline": ("ro", PROBE),
    "rw-inline": ("rw", PROBE),
}
DEFAULT_KINDS = "plain,ro,rw,rw-1,rw-1024"
BIG_OVERLAY_MIB = 8192
START_TARGET_S, END_TARGET_S = 0.5, 0.3


def boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def sh(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ensure_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        sh("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh",
           "--user-group", USER)
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def make_images(work: Path, root: Path, kinds: list[str], uid: int, gid: int) -> dict[str, Path]:
    """busybox imported with `sifoverlay import`, a sparse 1280 MiB overlay owned by the job
    user, one copy per overlay kind (rw jobs on one image would queue behind each other)."""
    from sifoverlay.engine import create_overlay

    layout = work / "layout"
    sh(sys.executable, str(REPO / "scripts" / "busybox-layout.py"), str(layout))
    base = work / "busybox.oci.sif"
    sh(str(REPO / ".venv" / "bin" / "sifoverlay"), "import", str(layout), str(base))
    create_overlay(base, size_mib=1280, sparse=True, uid=uid, gid=gid, journal_dir=str(work / "journal"))
    images = {}
    for kind in kinds:
        if KINDS[kind][0] is None:
            continue
        target = root / f"{kind}.oci.sif"
        if kind == "rw-8g":
            big = work / "big.oci.sif"
            sh(str(REPO / ".venv" / "bin" / "sifoverlay"), "import", str(layout), str(big))
            create_overlay(big, size_mib=BIG_OVERLAY_MIB, sparse=True, uid=uid, gid=gid,
                           journal_dir=str(work / "journal"))
            sh("cp", "--sparse=always", str(big), str(target))
            os.chown(target, uid, gid)
            images[kind] = target
            continue
        sh("cp", "--sparse=always", str(base), str(target))
        os.chown(target, uid, gid)
        images[kind] = target
    return images


def job_state(job: str) -> str:
    return sh("squeue", "-h", "-j", job, "-t", "all", "-o", "%T", check=False).stdout.strip()


def wait_idle(job: str, poll: float, timeout: float = 600) -> float:
    """Boot-clock time at which `job` was first seen no longer COMPLETING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "COMPLETING" not in job_state(job):
            return boot_clock()
        time.sleep(poll)
    raise SystemExit(f"job {job}: still COMPLETING after {timeout} s")


def wait_clean(job: str, journal_dir: str, poll: float, timeout: float = 900) -> float:
    """Boot-clock time at which no process holds `job`'s job-end lock any more."""
    from sifoverlay.slurm.endlock import in_progress

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not in_progress(journal_dir, job):
            return boot_clock()
        time.sleep(poll / 5)
    raise SystemExit(f"job {job}: its end still in progress after {timeout} s")


class PlugstackKey:
    """`prolog_mounts=inline` on the sifoverlay plugstack line for one job: the Prolog reads
    the line at every job, the plugin at every step (both accept the key)."""

    def __init__(self, source: str) -> None:
        self.path = Path(source.rsplit(":", 1)[0])
        self.original = self.current = self.path.read_text()

    def set(self, key: str, value: str | None) -> None:
        import re

        lines = []
        for line in self.original.splitlines(keepends=True):
            if "sifoverlay_spank.so" in line and not line.lstrip().startswith("#"):
                line = re.sub(rf"\s{key}=\S+", "", line.rstrip("\n"))
                line = (line + (f" {key}={value}" if value else "")) + "\n"
            lines.append(line)
        self._write("".join(lines))

    def restore(self) -> None:
        self._write(self.original)

    def _write(self, text: str) -> None:
        if text == self.current:
            return
        tmp = self.path.with_name(self.path.name + ".bench")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)
        self.current = text


PLUGSTACK: PlugstackKey | None = None


def run_job(kind: str, image: Path | None, poll: float, journal_dir: str = "") -> dict[str, float]:
    if PLUGSTACK is not None:
        PLUGSTACK.set("prolog_mounts", "inline" if kind.endswith("-inline") else None)
    mode, script = KINDS[kind]
    option = [] if image is None else [f"--oci-sif-overlay={image}:{mode}"]
    argv = ["runuser", "-u", USER, "--", "env", "-i", *USER_ENV, "srun", "-N1", "-n1", *option,
            "sh", "-c", script]
    submitted = boot_clock()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, cwd="/")
    returned = boot_clock()
    if proc.returncode != 0:
        raise SystemExit(f"{kind}: srun failed ({proc.returncode}): {proc.stderr[-2000:]}")
    uptimes = [float(line.split()[0]) for line in proc.stdout.splitlines()
               if line and line[0].isdigit() and len(line.split()) == 2]
    job = next(line.split("=", 1)[1] for line in proc.stdout.splitlines() if line.startswith("job="))
    idle = wait_idle(job, poll)
    clean = wait_clean(job, journal_dir, poll) if journal_dir else idle
    return {"submit_to_start": uptimes[0] - submitted, "start_to_end": returned - uptimes[-1],
            "end_to_idle": idle - returned, "end_to_clean": clean - returned, "work": uptimes[-1] - uptimes[0],
            "job": float(job)}


def phase_table(samples: dict[str, list[dict[str, float]]], timing: Path, since: float) -> None:
    """Medians of the Prolog, Epilog and worker phases per kind, from timing.jsonl."""
    import json

    by_job: dict[str, dict[str, dict[str, object]]] = {}
    if timing.exists():
        for line in timing.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if float(record.get("time", 0)) >= since:
                by_job.setdefault(str(record["job"]), {})[str(record["entry"])] = record
    if not by_job:
        print(f"phase breakdown: no timing records in {timing}")
        return
    print(f"phase breakdown (medians in ms, from {timing}):")
    for kind, rows in samples.items():
        for entry in ("prolog", "epilog", "worker"):
            found = [by_job.get(str(int(r["job"])), {}).get(entry) for r in rows]
            records = [r for r in found if r is not None]
            if not records:
                continue
            names: list[str] = []
            for r in records:
                names += [n for n in r["phases"] if n not in names]  # type: ignore[attr-defined]
            cells = [f"{n}={statistics.median(float(r['phases'].get(n, 0.0)) for r in records) * 1000:.0f}"  # type: ignore[attr-defined]
                     for n in names]
            total = statistics.median(float(r["total"]) for r in records) * 1000  # type: ignore[arg-type]
            exits = [float(r["marks"]["prolog_exit"]) for r in records if "prolog_exit" in r.get("marks", {})]  # type: ignore[attr-defined,index]
            exited = f" (Prolog exited at {statistics.median(exits) * 1000:.0f})" if exits else ""
            print(f"  {kind:<9} {entry:<7} total={total:.0f}{exited}  " + " ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kinds", default=DEFAULT_KINDS, help=f"from {', '.join(KINDS)}")
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new round after this many seconds (the table covers the complete rounds)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--load", type=int, default=0, help="busy loops running during the rounds")
    args = parser.parse_args()
    began = time.monotonic()
    kinds = [k for k in args.kinds.split(",") if k]
    if os.geteuid() != 0 or "plain" not in kinds or any(k not in KINDS for k in kinds):
        parser.error(f"needs root and kinds from {sorted(KINDS)} including plain")
    from sifoverlay.slurm.config import load_config

    config = load_config()
    from sifoverlay.slurm.phases import timing_path

    timing = Path(timing_path() or "/var/log/sifoverlay/timing.jsonl")
    started_wall = time.time()
    journal = config.journal_dir
    print(f"epilog_reconcile={config.epilog_reconcile}")
    root = Path(config.image_roots[0]) / f"bench-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    work = Path(tempfile.mkdtemp(prefix="sifoverlay-jobbench-"))
    uid, gid = ensure_user()
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    global PLUGSTACK
    if any(k.endswith("-inline") for k in kinds):
        PLUGSTACK = PlugstackKey(config.source)
    busy: list[subprocess.Popen[bytes]] = []
    try:
        images = make_images(work, root, kinds, uid, gid)
        run_job("plain", None, args.poll)  # warm caches (slurmd, page cache)
        for kind in kinds:
            if kind != "plain":
                run_job(kind, images[kind], args.poll, journal)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        load_before = os.getloadavg()[0]
        rounds = 0
        try:
            for _ in range(args.runs):
                if args.max_seconds is not None and time.monotonic() - began > args.max_seconds:
                    print(f"--max-seconds reached after {rounds} rounds", file=sys.stderr)
                    break
                got = {kind: run_job(kind, images.get(kind), args.poll, journal) for kind in kinds}
                for kind, sample in got.items():
                    samples[kind].append(sample)
                rounds += 1
        except SystemExit as exc:
            print(f"stopped after {rounds} complete rounds: {exc}", file=sys.stderr)
            if rounds == 0:
                raise
        load_after = os.getloadavg()[0]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        if PLUGSTACK is not None:
            PLUGSTACK.restore()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    print(f"{rounds} jobs per kind, interleaved; {args.load} busy loops; load average (1 min) {load_before:.2f} -> {load_after:.2f}; "
          f"{os.cpu_count()} CPUs; medians in seconds, (+x) = difference to plain in this run")
    fields = ("submit_to_start", "start_to_end", "end_to_idle", "end_to_clean", "work")
    base = {f: statistics.median(s[f] for s in samples["plain"]) for f in fields}
    print(f"{'kind':<9}" + "".join(f"{f:>21}" for f in fields))
    verdicts = []
    for kind in kinds:
        med = {f: statistics.median(s[f] for s in samples[kind]) for f in fields}
        slow = sum(1 for x in samples[kind] if x["submit_to_start"] - base["submit_to_start"] > START_TARGET_S)
        print(f"{kind:<9}" + "".join(f"{med[f]:>11.3f} ({med[f] - base[f]:+6.3f})" for f in fields)
              + f"   slow starts {slow}/{len(samples[kind])}")
        if kind in ("ro", "rw"):
            start = med["submit_to_start"] - base["submit_to_start"]
            end = (med["start_to_end"] + med["end_to_idle"]) - (base["start_to_end"] + base["end_to_idle"])
            verdicts.append(f"{kind}: start +{start:.3f} s (<= {START_TARGET_S}: "
                            f"{'met' if start <= START_TARGET_S else 'NOT met'}), end +{end:.3f} s "
                            f"(<= {END_TARGET_S}: {'met' if end <= END_TARGET_S else 'NOT met'})")
        if kind == "rw-8g":
            idle = med["end_to_idle"] - base["end_to_idle"]
            by_job = _worker_hash_seconds(timing, started_wall)
            pairs = [(s["end_to_clean"], by_job[str(int(s["job"]))]) for s in samples[kind]
                     if str(int(s["job"])) in by_job]
            hashes = [h for _, h in pairs]
            clean_late = statistics.median(c - h for c, h in pairs) if pairs else float("nan")
            verdicts.append(f"rw-8g: end-to-idle +{idle:.3f} s (<= 1: {'met' if idle <= 1 else 'NOT met'}), "
                            f"clean {clean_late:+.3f} s after hash time (<= 1: "
                            f"{'met' if clean_late <= 1 else 'NOT met'}; median hash "
                            f"{statistics.median(hashes) if hashes else float('nan'):.3f} s)")
    print("targets: " + "; ".join(verdicts))
    phase_table(samples, timing, started_wall)
    return 0


def _worker_hash_seconds(timing: Path, since: float) -> dict[str, float]:
    """Job id -> the hash phase of its end (worker, else Epilog) from timing.jsonl."""
    import json

    hashes: dict[str, float] = {}
    if timing.exists():
        for line in timing.read_text().splitlines():
            record = json.loads(line)
            if float(record.get("time", 0)) >= since and "hash" in record.get("phases", {}):
                hashes[str(record["job"])] = float(record["phases"]["hash"])
    return hashes


if __name__ == "__main__":
    sys.exit(main())
