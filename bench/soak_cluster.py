"""The multi-node soak (`bench/soak.py --nodes 3`): N jobs over K images on the test bed
(`slurm_plugin/dev-cluster up --nodes 3`), with random job kinds and node failures, a
monitor that samples every node's mounts, and the independent image check of soak.py.

Job kinds: rw writers (some disturbed: `scancel`, `scancel -s KILL`, a time-limit hit),
`:ro` readers on one node and across all nodes (`-N3`), and rw arrays (`--array=1-3`, each
task writes its own file). Node events between jobs: a node killed (then booted), cut off
(then healed), frozen shortly (below the lease's ttl) or past ttl + grace (then thawed).
Every rw job writes the file /soak/<name> (content: its name) via a rename at its end, so
a file exists iff its job got to the end; every COMPLETED rw job's file must be in the
image at the end. A job may fail only by the rules: refused by the lease (busy image:
"held by"), or NODE_FAIL/killed by a node event; anything else counts as unexpected.

The monitor reads /proc/<node holder>/mountinfo of every node every 0.25 s: a job's
writable ext3 mount is `<runtime_dir>/mounts/<job>/ext3` with the "rw" option. Two such
mounts of one image at one time (on any nodes) is a double rw mount.

At the end the bed is reset (thaw, heal, boot, resume), the cluster sweeper runs on n1
until no session is open, and every image is checked: soak.check_image (no sifoverlay
code), `overlay status --verify` clean, files of COMPLETED rw jobs read back.
Prints one JSON object; exit status 1 when any check failed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import soak  # noqa: E402  (the single-node soak: image check, helpers)

BED_CONF = "/etc/slurm-sifomn/slurm.conf"
BED_RUN = Path("/run/slurm-sifomn")
PYTHON = "/opt/sifoverlay/bin/python"
TERMINAL = soak.TERMINAL


def bed_config() -> Any:
    sys.path.insert(0, str(REPO))
    from sifoverlay.slurm.config import load_config

    return load_config(env={"SLURM_CONF": BED_CONF})


@dataclass
class Job:
    name: str
    image: str
    kind: str  # rw | rw-scancel | rw-kill | rw-timeout | ro | ro-all | array
    job_id: str = ""
    states: dict[str, str] = field(default_factory=dict)  # task id (or "") -> final state
    out: str = ""


class Monitor(threading.Thread):
    """Samples every node's mounts; counts double rw mounts of one image, and samples where
    a rw mount of an image coexists with another job's ro mount of it (reader/writer).
    Whether a job's ext3 mount is writable comes from the runtime's record of the job
    (state.json "writable"), not from mountinfo: fuse2fs mounted read-only still shows
    "rw" there (engine/quiesce.py)."""

    def __init__(self, nodes: list[str], mounts_dir: str, image_of: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.nodes, self.mounts_dir, self.image_of = nodes, mounts_dir.rstrip("/"), image_of
        self.stop = threading.Event()
        self.samples = 0
        self.double: list[str] = []
        self.mixed: list[str] = []
        self.max_rw: dict[str, int] = {}
        self.writable: dict[str, bool] = {}

    def ext3_mounts(self) -> list[tuple[str, str]]:
        found = []
        pattern = re.compile(re.escape(self.mounts_dir) + r"/([^/]+)/ext3$")
        for node in self.nodes:
            try:
                holder = int((BED_RUN / f"{node}.holder").read_text().split()[0])
                lines = Path(f"/proc/{holder}/mountinfo").read_text().splitlines()
            except (OSError, ValueError, IndexError):
                continue  # node down or booting
            for line in lines:
                fields = line.split()
                match = pattern.match(fields[4]) if len(fields) > 5 else None
                if match:
                    found.append((node, match.group(1)))
        return found

    def image_for(self, node: str, job: str) -> str:
        """The image of a job's mount: the runtime's record on that node (array tasks have
        job ids of their own), read through the node holder's root (its mount namespace)."""
        if job not in self.image_of or job not in self.writable:
            try:
                holder = int((BED_RUN / f"{node}.holder").read_text().split()[0])
                record = json.loads(Path(f"/proc/{holder}/root{self.mounts_dir}/{job}/state.json").read_text())
                self.image_of[job] = str(record["image"])
                self.writable[job] = bool(record["writable"])
            except (OSError, ValueError, KeyError, IndexError):
                return self.image_of.get(job, f"job {job}")
        return self.image_of[job]

    def run(self) -> None:
        while not self.stop.wait(0.25):
            writers: dict[str, list[str]] = {}
            readers: dict[str, list[str]] = {}
            for node, job in self.ext3_mounts():
                image = self.image_for(node, job)
                # no record (yet, or any more): counted as a writer, the worst case
                (writers if self.writable.get(job, True) else readers).setdefault(image, []).append(f"{node}:{job}")
            self.samples += 1
            for image, where in writers.items():
                self.max_rw[image] = max(self.max_rw.get(image, 0), len(where))
                if len(where) > 1:
                    self.double.append(f"{image}: {' '.join(where)}")
                if readers.get(image):
                    self.mixed.append(f"{image}: rw {' '.join(where)} ro {' '.join(readers[image])}")


@dataclass
class ClusterSoak:
    n: int
    k: int
    seed: int
    nodes: int
    work: Path
    config: Any
    rng: random.Random = field(init=False)
    images: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=lambda: {k: 0 for k in (
        "scancel", "scancel_kill", "time_limit", "node_kill", "node_cut", "node_freeze_short", "node_freeze_long")})

    def __post_init__(self) -> None:
        self.drained: list[str] = []
        self.rng = random.Random(self.seed)
        self.node_names = [f"n{i}" for i in range(1, self.nodes + 1)]

    # -- plumbing ---------------------------------------------------------------------------
    def dev(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return soak.run([soak.DEV_CLUSTER, *args], check=False, timeout=timeout)

    def node_state(self, node: str) -> str:
        """slurmctld's State= of the node, lower case ("idle", "idle+completing",
        "down+not_responding"). Not `sinfo -o %T`, which kept printing "mixed" for a booted
        node slurmctld had IDLE with no CPU allocated (tests/cluster's Bed.node_state)."""
        shown = soak.run(["scontrol", "-o", "show", "node", node], check=False).stdout
        return next((f.split("=", 1)[1] for f in shown.split() if f.startswith("State=")), "").lower()

    def reset_nodes(self) -> None:
        for node in self.node_names:
            self.dev("node", "thaw", node)
            self.dev("node", "heal", node)
            self.dev("node", "boot", node)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = {n: self.node_state(n) for n in self.node_names}
            if all(s.split("+")[0] in ("idle", "mixed", "allocated") and not any(
                    bad in s for bad in ("down", "drain", "fail", "not_responding")) for s in states.values()):
                return
            for node, state in states.items():
                if any(bad in state for bad in ("down", "drain", "fail")):
                    soak.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
            time.sleep(1)

    # -- setup ------------------------------------------------------------------------------
    def make_images(self) -> None:
        env = dict(os.environ, SIFOVERLAY_JOURNAL_DIR=self.config.journal_dir,
                   SIFOVERLAY_STATE_DIR=self.config.state_dir)
        base = self.work / "base.oci.sif"
        soak.run([sys.executable, str(soak.LAYOUT_SCRIPT), str(self.work / "busybox-layout")])
        soak.run([soak.SIFOVERLAY, "import", str(self.work / "busybox-layout"), str(base)])
        soak.run([soak.SIFOVERLAY, "overlay", "create", "--sparse", "--size", "64", str(base)], env=env)
        soak.run([soak.SIFOVERLAY, "exec", "--allow-root-options", "--writable", "--base-dir", str(self.work / "run"),
                  "--journal-dir", self.config.journal_dir, str(base), "--", "/bin/sh", "-c",
                  f"mkdir /soak && chown {soak.SOAK_UID}:{soak.SOAK_UID} /soak"], env=env)
        for i in range(self.k):
            path = self.work / f"img{i}.oci.sif"
            soak.run(["cp", "--sparse=always", str(base), str(path)])
            self.images.append(str(path))
        base.unlink()
        soak.run(["chown", "-R", f"{soak.SOAK_USER}:{soak.SOAK_USER}", str(self.work)])

    # -- jobs -------------------------------------------------------------------------------
    def name(self) -> str:
        return f"cs-{self.seed}-{len(self.jobs)}-{uuid.uuid4().hex[:4]}"

    @staticmethod
    def writer(name: str, steps: int) -> str:
        return (f"i=0; while [ $i -lt {steps} ]; do echo {name}-$i >> /soak/{name}.partial; sleep 0.3; i=$((i+1)); done; "
                f"echo {name} > /soak/{name}.tmp && mv /soak/{name}.tmp /soak/{name}")

    def submit(self, job: Job, args: list[str], script: str) -> None:
        out = self.work / "out" / f"{job.name}.%A_%a.out"
        # as_user starts from an empty environment: the bed's SLURM_CONF goes on the command line
        proc = soak.as_user(soak.SOAK_USER, ["env", f"SLURM_CONF={BED_CONF}", "sbatch", "--parsable", "-J", job.name,
                                             "-o", str(out), *args, "--wrap", script], check=False, cwd="/tmp")
        if proc.returncode != 0:
            job.states[""] = "SUBMIT_REFUSED"
            job.out = proc.stderr.strip()
        else:
            job.job_id = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)

    def one_job(self) -> Job:
        kind = self.rng.choice(["rw"] * 5 + ["rw-scancel", "rw-kill", "rw-timeout"] + ["ro"] * 2 + ["ro-all", "array"])
        image = self.rng.choice(self.images)
        job = Job(self.name(), image, kind)
        if kind == "ro":
            self.submit(job, ["-t", "5", f"--oci-sif-overlay={image}:ro"], "ls /soak > /dev/null; sleep 1")
        elif kind == "ro-all":
            self.submit(job, ["-t", "5", f"-N{self.nodes}", f"--oci-sif-overlay={image}:ro"],
                        "srun ls /soak > /dev/null; sleep 1")
        elif kind == "array":
            script = self.writer(f"{job.name}_$SLURM_ARRAY_TASK_ID", 2)
            self.submit(job, ["-t", "5", "--array=1-3", f"--oci-sif-overlay={image}"], script)
        else:
            steps = 60 if kind == "rw-timeout" else self.rng.randint(1, 8)
            self.submit(job, ["-t", "5", f"--oci-sif-overlay={image}"], self.writer(job.name, steps))
            if job.job_id and kind != "rw":
                threading.Thread(target=self.disturb, args=(job,), daemon=True).start()
        return job

    def disturb(self, job: Job) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = soak.run(["squeue", "-h", "-j", job.job_id, "-o", "%T %r"], check=False).stdout.strip()
            if state.startswith("RUNNING") and "Prolog" not in state:
                break
            if not state or state.split()[0] in TERMINAL:
                return
            time.sleep(0.3)
        time.sleep(self.rng.uniform(0.3, 1.5))
        if job.kind == "rw-scancel":
            soak.run(["scancel", job.job_id], check=False)
            self.events["scancel"] += 1
        elif job.kind == "rw-kill":
            soak.run(["scancel", "-s", "KILL", job.job_id], check=False)
            self.events["scancel_kill"] += 1
        elif job.kind == "rw-timeout":
            soak.run(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=0"], check=False)
            self.events["time_limit"] += 1

    def node_event(self, event: str | None = None) -> None:
        node = self.rng.choice(self.node_names)
        event = event or self.rng.choice(["node_kill", "node_cut", "node_freeze_short", "node_freeze_long"])
        ttl, grace = self.config.lease_ttl, self.config.lease_grace
        if event == "node_kill":
            self.dev("node", "kill", node)
            time.sleep(self.rng.uniform(2, 5))
            self.dev("node", "boot", node)
        elif event == "node_cut":
            self.dev("node", "cut", node)
            time.sleep(self.rng.uniform(3, ttl + grace + 5))
            self.dev("node", "heal", node)
        elif event == "node_freeze_short":
            self.dev("node", "freeze", node)
            time.sleep(self.rng.uniform(0.5, ttl / 2))
            self.dev("node", "thaw", node)
        else:
            self.dev("node", "freeze", node)
            time.sleep(ttl + grace + self.rng.uniform(1, 4))
            self.dev("node", "thaw", node)
        soak.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
        self.events[event] += 1

    def run_jobs(self) -> None:
        events_due = sorted(self.rng.sample(range(1, max(2, self.n)), min(max(4, self.n // 12), max(1, self.n - 1))))
        first_events = ["node_kill", "node_cut", "node_freeze_short", "node_freeze_long"]
        submitted = 0
        while submitted < self.n:
            self.throttle()
            job = self.one_job()
            submitted += 1
            if events_due and submitted >= events_due[0]:
                events_due.pop(0)
                # every kind of node event at least once, in random order, then any
                self.node_event(first_events.pop(self.rng.randrange(len(first_events))) if first_events else None)
            del job

    def note_states(self) -> None:
        """Record every final job (array task) state while slurmctld still lists it: it
        forgets finished jobs after MinJobAge (300 s), and the bed keeps no accounting, so
        states read only at the end came back unknown ("GONE") for a long soak."""
        final: dict[str, str] = {}
        for line in soak.run(["squeue", "-h", "-u", soak.SOAK_USER, "-t", "all", "-o", "%i %T"],
                             check=False).stdout.splitlines():
            ident, _, state = line.partition(" ")
            if state.strip() in TERMINAL:
                final[ident] = state.strip()
        for job in self.jobs:
            if not job.job_id:
                continue
            for ident, state in final.items():
                if ident == job.job_id:
                    job.states[""] = state
                elif ident.startswith(f"{job.job_id}_") and ident[len(job.job_id) + 1:].isdigit():
                    job.states[ident[len(job.job_id) + 1:]] = state

    def throttle(self, limit: int = 6) -> None:
        deadline = time.monotonic() + 300
        self.note_states()
        while time.monotonic() < deadline:
            out = soak.run(["squeue", "-h", "-u", soak.SOAK_USER, "-t", "PENDING,RUNNING,COMPLETING", "-o", "%i"],
                           check=False).stdout.split()
            if len(out) < limit:
                return
            time.sleep(0.5)

    def resume_drained(self) -> None:
        """A node Slurm drained or set DOWN (e.g. a Prolog killed) keeps the jobs pinned to
        it PENDING forever: note why (reported as nodes_drained) and resume it."""
        for node in self.node_names:
            if not any(bad in self.node_state(node) for bad in ("drain", "down")):
                continue
            shown = soak.run(["scontrol", "-o", "show", "node", node], check=False).stdout
            reason = re.search(r"Reason=(.*?)(?: \w+=|$)", shown)
            note = f"{node}: {reason.group(1) if reason else '?'}"
            if note not in self.drained:
                self.drained.append(note)
            soak.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)

    def drain(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = soak.run(["squeue", "-h", "-u", soak.SOAK_USER, "-o", "%i"], check=False).stdout.split()
            self.note_states()
            if not live:
                break
            self.resume_drained()
            time.sleep(2)
        for job in self.jobs:
            if not job.job_id:
                continue
            for line in soak.run(["sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "JobID,State"],
                                 check=False).stdout.splitlines():
                task, _, state = line.partition("|")
                job.states[task.partition("_")[2]] = state.split()[0] if state else "?"
            if not job.states:
                fields = soak.run(["scontrol", "show", "job", "-o", job.job_id], check=False).stdout
                for row in fields.splitlines():
                    state = re.search(r"JobState=(\S+)", row)
                    task = re.search(r"ArrayTaskId=(\S+)", row)
                    job.states[task.group(1) if task else ""] = state.group(1) if state else "GONE"
            if not job.states:
                job.states[""] = "GONE"

    def sweep_until_clean(self, timeout: float) -> list[dict[str, Any]]:
        reports = []
        deadline = time.monotonic() + timeout
        sys.path.insert(0, str(REPO))
        from sifoverlay.engine import sessions

        while time.monotonic() < deadline:
            done = self.dev("node", "exec", "n1", PYTHON, "-m", "sifoverlay.slurm.sweeper", "--json")
            try:
                reports.append(json.loads(done.stdout))
            except ValueError:
                reports.append({"error": done.stderr[-300:]})
            if not sessions.open_sessions(self.config.journal_dir):
                break
            time.sleep(2)
        return reports


def main(args: Any) -> int:
    os.environ["SLURM_CONF"] = BED_CONF
    start = time.monotonic()
    up = soak.run([soak.DEV_CLUSTER, "up", "--nodes", str(args.nodes)], check=False, timeout=900)
    if up.returncode != 0:
        print(f"soak.py --nodes: the test bed did not come up: {up.stderr.strip()[-500:]}", file=sys.stderr)
        return 2
    config = bed_config()
    soak.ensure_user(soak.SOAK_USER, soak.SOAK_UID)
    root = Path(config.image_roots[0]) if config.image_roots else soak.IMAGE_ROOT
    work = root / f"csoak-{args.seed}-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    (work / "out").mkdir()
    run = ClusterSoak(args.n, args.k, args.seed, args.nodes, work, config)
    image_of: dict[str, str] = {}
    monitor = Monitor(run.node_names, config.mounts_dir, image_of)
    try:
        run.make_images()
        soak.run(["chown", f"{soak.SOAK_USER}:{soak.SOAK_USER}", str(work / "out")])
        monitor.start()
        original_submit = run.submit

        def submit(job: Job, sargs: list[str], script: str) -> None:
            original_submit(job, sargs, script)
            if job.job_id:
                image_of[job.job_id] = job.image

        run.submit = submit  # type: ignore[method-assign]
        run.run_jobs()
        run.drain()
        run.reset_nodes()
        reports = run.sweep_until_clean(config.lease_ttl + config.lease_grace + 120)
        monitor.stop.set()
        monitor.join(5)
        result = verify(run, monitor, reports)
    finally:
        monitor.stop.set()
        soak.run(["scancel", "-u", soak.SOAK_USER], check=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if result["ok"] else 1


RULE_FAILURES = ("held by", "held read-only", "busy")


def verify(run: ClusterSoak, monitor: Monitor, reports: list[dict[str, Any]]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from sifoverlay.engine import sessions

    problems: list[str] = []
    by_state: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    failed_by_rule, failed_by_node, failed_unexpected = 0, 0, 0
    failures: list[dict[str, Any]] = []  # every failed task with its class and the line that says why
    expected: dict[str, list[str]] = {}
    node_event_jobs = run.events["node_kill"] + run.events["node_cut"] + run.events["node_freeze_long"]
    for job in run.jobs:
        by_kind[job.kind] = by_kind.get(job.kind, 0) + 1
        for task, state in job.states.items():
            by_state[state] = by_state.get(state, 0) + 1
            fname = f"{job.name}_{task}" if job.kind == "array" else job.name
            if state == "COMPLETED" and job.kind in ("rw", "array", "rw-scancel", "rw-kill", "rw-timeout"):
                expected.setdefault(job.image, []).append(fname)
            if state in ("FAILED", "SUBMIT_REFUSED"):
                text = job.out
                for path in (run.work / "out").glob(f"{job.name}.*"):
                    text += path.read_text(errors="replace")
                why = next((line.strip() for line in text.splitlines() if any(w in line for w in RULE_FAILURES)), "")
                if why:
                    failed_by_rule += 1
                    verdict = "rule"
                elif node_event_jobs:
                    failed_by_node += 1  # a task killed with its node (the job's stderr went with it)
                    verdict = "node event"
                else:
                    failed_unexpected += 1
                    verdict = "unexpected"
                    problems.append(f"job {job.job_id} ({job.kind}) task {task or '-'} FAILED: {text.strip()[-200:]}")
                failures.append({"job": job.job_id, "kind": job.kind, "task": task, "state": state, "class": verdict,
                                 "why": (why or next(iter(text.strip().splitlines()[-1:]), ""))[-300:]})
            elif state in ("NODE_FAIL", "BOOT_FAIL"):
                failed_by_node += 1
                failures.append({"job": job.job_id, "kind": job.kind, "task": task, "state": state,
                                 "class": "node event", "why": state})
    images_ok, files_verified, files_expected, drift = 0, 0, 0, {}
    env = dict(os.environ, SIFOVERLAY_JOURNAL_DIR=run.config.journal_dir, SIFOVERLAY_STATE_DIR=run.config.state_dir)
    for image in run.images:
        check = soak.check_image(image)
        images_ok += bool(check["ok"])
        problems += [f"{image}: {p}" for p in check["problems"]]
        status = soak.run([soak.SIFOVERLAY, "overlay", "status", "--verify", "--json", image], check=False, env=env)
        state = json.loads(status.stdout)["state"] if status.stdout.strip() else f"error: {status.stderr.strip()}"
        drift[state] = drift.get(state, 0) + 1
        if state != "clean":
            problems.append(f"{image}: drift state {state}")
        names = expected.get(image, [])
        files_expected += len(names)
        found = read_back(run, image, env)
        for name in names:
            if found.get(name) == name:
                files_verified += 1
            else:
                problems.append(f"{image}: file /soak/{name} of a COMPLETED job is {found.get(name)!r}")
    left = sessions.open_sessions(run.config.journal_dir)
    if left:
        problems.append(f"{len(left)} job sessions still open: {[(s.job_id, s.host) for s in left][:5]}")
    hook_errors = [d for d in run.drained if any(w in d for w in ("Prolog error", "Epilog error", "Kill task"))]
    if hook_errors:
        problems.append(f"nodes drained by a failed hook: {hook_errors}")
    if monitor.double:
        problems.append(f"{len(monitor.double)} samples with a double rw mount: {monitor.double[:3]}")
    outcomes: dict[str, int] = {}
    for report in reports:
        for o in report.get("outcomes", []):
            outcomes[str(o.get("result"))] = outcomes.get(str(o.get("result")), 0) + 1
    return {
        "ok": not problems and images_ok == len(run.images) and files_verified == files_expected,
        "nodes": run.nodes, "n": run.n, "k": run.k, "seed": run.seed,
        "jobs_submitted": len(run.jobs), "jobs_by_kind": by_kind,
        "tasks_by_state": by_state, "failed_by_rule": failed_by_rule, "failed_by_node_event": failed_by_node,
        "failed_unexpected": failed_unexpected, "failures": failures, "events": run.events,
        "images_checked": len(run.images), "images_consistent": images_ok, "drift_states": drift,
        "files_expected": files_expected, "files_verified": files_verified,
        "mount_samples": monitor.samples, "double_rw_mounts": len(monitor.double),
        "rw_with_ro_mount_samples": len(monitor.mixed), "rw_with_ro_mount_examples": monitor.mixed[:3],
        "max_rw_mounts_per_image": max(monitor.max_rw.values(), default=0),
        "final_sweeps": len(reports), "final_sweep_outcomes": outcomes, "nodes_drained": run.drained,
        "problems": problems[:20],
    }


def read_back(run: ClusterSoak, image: str, env: dict[str, str]) -> dict[str, str]:
    proc = soak.run([soak.SIFOVERLAY, "exec", "--allow-root-options", "--base-dir", str(run.work / "run"),
                     "--journal-dir", run.config.journal_dir, image, "--", "/bin/sh", "-c",
                     "cd /soak 2>/dev/null && for f in *; do case $f in *.*) continue;; esac; "
                     "echo \"$f=$(cat \"$f\")\"; done"], check=False, timeout=180, env=env)
    found = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        found[key] = value
    return found
