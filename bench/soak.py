#!/usr/bin/env python3
"""Soak: N jobs over K images through the real Slurm, with random kills, then an
independent consistency check of every image.

    .venv/bin/python bench/soak.py --n 200 --k 5 [--seed S] [--json-out FILE]
    .venv/bin/python bench/soak.py --nodes 3 --n 200 --k 5   (multi-node: bench/soak_cluster.py)

Needs root and the local cluster (`slurm_plugin/dev-cluster up`; never taken down here:
the cluster is shared). Every job writes a file named after itself into its image's
overlay through `sbatch --oci-sif-overlay=IMAGE`; a chosen fraction is disturbed:
`scancel`, `scancel -s KILL`, a time-limit hit (`scontrol update JobId=J TimeLimit=0`),
`kill -9` of slurmd while the job runs (slurmd restarted), and bursts of concurrent
submissions on the same image (a job that finds the image held by another writer is
refused by the lease and FAILS, by design; the file of such a job is not expected).

At the end the sweeper runs (`sifoverlay recover --slurm`), then every image is checked
WITHOUT our library: the SIF header and descriptor table are parsed here with `struct`,
every OCI digest is recomputed with hashlib over the bytes it names, exactly one root
index must exist, the manifest/config/diff_ids must agree; every file written by a job
that COMPLETED is read back through `sifoverlay exec` (content = the job's name); every
image's drift state (`sifoverlay overlay status --verify --json`) must be `clean`.
Prints one JSON object; exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIFOVERLAY = str(REPO / ".venv" / "bin" / "sifoverlay")
DEV_CLUSTER = str(REPO / "slurm_plugin" / "dev-cluster")
LAYOUT_SCRIPT = REPO / "scripts" / "busybox-layout.py"  # Debian's busybox-static as an OCI layout
IMAGE_ROOT = Path(os.environ.get("SIFOVERLAY_IMAGE_ROOTS", "/var/tmp/sifoverlay-images").split(":")[0])
JOURNAL_DIR = os.environ.get("SIFOVERLAY_JOURNAL_DIR", "/var/lib/sifoverlay/journal")
SOAK_USER = "sifsoak"
SOAK_UID = 4813
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

# ---------------------------------------------------------------------------------------
# Independent image check: SIF layout from the spec (ocisif-format.md §1), no sifoverlay code.
HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCRIPTOR = struct.Struct("<iBIIIqqqqqqq128s384s")
DESCRIPTOR_SIZE = 585
OCI_ROOT_INDEX, OCI_BLOB = 0x400A, 0x400B
EXT3 = "application/vnd.sylabs.image.layer.v1.ext3"


def sha256_range(fd: int, offset: int, size: int) -> str:
    h = hashlib.sha256()
    pos, end = offset, offset + size
    while pos < end:
        chunk = os.pread(fd, min(8 << 20, end - pos), pos)
        if not chunk:
            raise ValueError(f"short read at {pos}")
        h.update(chunk)
        pos += len(chunk)
    return "sha256:" + h.hexdigest()


def check_image(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Independent consistency check. Returns {ok, problems, blobs, overlay_digest,
    overlay_matches}; `overlay_matches` is False when only the overlay's recorded digest
    is stale (a legitimately 'modified' image), which `ok` counts as a problem."""
    problems: list[str] = []
    out: dict[str, Any] = {"image": os.fspath(path), "ok": False, "problems": problems, "blobs": 0,
                           "overlay_digest": None, "overlay_matches": None}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, HEADER.size, 0)
        if len(raw) < HEADER.size:
            problems.append("file shorter than a SIF header")
            return out
        _, magic, _, _, _, _, _, free, total, doff, dsize, data_off, data_size = HEADER.unpack(raw)
        if magic != b"SIF_MAGIC\0":
            problems.append("bad SIF magic")
            return out
        if dsize != total * DESCRIPTOR_SIZE or doff + dsize > size:
            problems.append("descriptor table outside the file")
            return out
        table = os.pread(fd, dsize, doff)
        by_digest: dict[str, list[tuple[int, int, int]]] = {}
        roots = []
        used = 0
        furthest = data_off
        for slot in range(total):
            fields = DESCRIPTOR.unpack_from(table, slot * DESCRIPTOR_SIZE)
            dtype, is_used, ident, _, _, offset, length = fields[:7]
            if not is_used:
                continue
            used += 1
            furthest = max(furthest, offset + length)
            if ident != slot + 1:
                problems.append(f"slot {slot} has id {ident}")
            if offset < data_off or offset + length > size:
                problems.append(f"object {ident} [{offset}, {offset + length}) outside the data area/file")
                continue
            if dtype in (OCI_ROOT_INDEX, OCI_BLOB):
                digest = fields[13].split(b"\0", 1)[0].decode("ascii", "replace")
                by_digest.setdefault(digest, []).append((ident, offset, length))
                if dtype == OCI_ROOT_INDEX:
                    roots.append((digest, offset, length))
        if total - used != free:
            problems.append(f"header says {free} free slots, table has {total - used}")
        if data_off + data_size != furthest:
            problems.append(f"header DataSize {data_size} != end of furthest object {furthest - data_off}")
        for digest, places in by_digest.items():
            if len(places) > 1:
                problems.append(f"{len(places)} objects carry digest {digest}")
        mismatched = {}
        for digest, places in by_digest.items():
            _, offset, length = places[0]
            actual = sha256_range(fd, offset, length)
            if actual != digest:
                mismatched[digest] = actual
        out["blobs"] = sum(len(p) for p in by_digest.values())
        if len(roots) != 1:
            problems.append(f"{len(roots)} root indexes (want exactly 1)")
            return out

        def blob(digest: str, want_size: int | None, what: str) -> bytes | None:
            places = by_digest.get(digest)
            if not places:
                problems.append(f"{what} {digest} does not resolve")
                return None
            _, offset, length = places[0]
            if want_size is not None and want_size != length:
                problems.append(f"{what} {digest}: size {want_size} in JSON, {length} stored")
            return os.pread(fd, length, offset)

        index = json.loads(blob(roots[0][0], None, "root index") or b"{}")
        images = [e for e in index.get("manifests", []) if "manifest" in str(e.get("mediaType"))]
        if len(images) != 1:
            problems.append(f"root index has {len(images)} image entries")
            return out
        manifest = json.loads(blob(images[0]["digest"], images[0]["size"], "manifest") or b"{}")
        cfg = manifest.get("config", {})
        config = json.loads(blob(cfg.get("digest", ""), cfg.get("size"), "config") or b"{}")
        layers = manifest.get("layers", [])
        for layer in layers:
            blob_places = by_digest.get(layer["digest"])
            if not blob_places:
                problems.append(f"layer {layer['digest']} does not resolve")
            elif blob_places[0][2] != layer["size"]:
                problems.append(f"layer {layer['digest']}: size {layer['size']} in JSON, {blob_places[0][2]} stored")
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if diff_ids != [layer["digest"] for layer in layers]:
            problems.append("config rootfs.diff_ids differ from the manifest's layer digests")
        overlay = layers[-1] if layers and layers[-1].get("mediaType") == EXT3 else None
        if overlay is not None:
            out["overlay_digest"] = overlay["digest"]
            out["overlay_matches"] = overlay["digest"] not in mismatched
        for digest, actual in mismatched.items():
            problems.append(f"object with digest {digest} hashes to {actual}")
    finally:
        os.close(fd)
    out["ok"] = not problems
    return out


# ---------------------------------------------------------------------------------------
# Slurm plumbing
def run(argv: list[str], *, check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def cluster_ready(wait: float) -> None:
    """`dev-cluster up` (idempotent; never `down`: the cluster is shared), polling while
    the Slurm integration is not installed yet."""
    deadline = time.monotonic() + wait
    while True:
        status = run([DEV_CLUSTER, "status"], check=False) if os.access(DEV_CLUSTER, os.X_OK) else None
        if status is not None and status.stdout.count(" running pid") >= 3 and oci_option_available():
            return  # up already (maybe busy with another engineer's jobs: `up` would wait for idle)
        if os.access(DEV_CLUSTER, os.X_OK):
            proc = run([DEV_CLUSTER, "up"], check=False, timeout=600)
            if proc.returncode == 0:
                return
            reason = proc.stderr.strip().splitlines()[-1:] or ["?"]
        else:
            reason = [f"{DEV_CLUSTER} is missing"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"local Slurm not available: {reason[0]}")
        time.sleep(60)


def oci_option_available(tries: int = 20) -> bool:
    """sbatch knows --oci-sif-overlay (retried: the plugin may be being reinstalled)."""
    for _ in range(tries):
        if "--oci-sif-overlay" in run(["sbatch", "--help"], check=False).stdout:
            return True
        time.sleep(3)
    return False


def ensure_user(name: str, uid: int) -> None:
    if run(["id", "-u", name], check=False).returncode != 0:
        run(["useradd", "--create-home", "--uid", str(uid), "--shell", "/bin/sh", name])


def as_user(user: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """argv as `user` with a minimal environment (jobs inherit the submitter's)."""
    return run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", *argv], **kw)


def job_states() -> dict[str, str] | None:
    """State of every job of the soak user that slurmctld still knows (a job leaves after
    MinJobAge), or None when squeue failed. Never `squeue --jobs LIST`: one aged-out id
    makes it fail for the whole list."""
    proc = run(["squeue", "--noheader", "--states=all", f"--user={SOAK_USER}", "--format=%i %T"], check=False)
    if proc.returncode != 0:
        return None
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


SLURMD_PIDFILE = Path("/run/sifoverlay-dev-cluster/slurmd.pid")


def slurmd_pid() -> int | None:
    """slurmd's pid from the dev cluster's pid file, if that process is alive."""
    try:
        pid = int(SLURMD_PIDFILE.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def restart_slurmd(wait: float = 60) -> None:
    """Start slurmd again the way dev-cluster does (not `dev-cluster up`: that waits for an
    idle node, and jobs are running). Retried: right after a kill -9 the new slurmd can
    fail to bind its port and exit."""
    deadline = time.monotonic() + wait
    while slurmd_pid() is None and time.monotonic() < deadline:
        subprocess.run(["/usr/sbin/slurmd", "-f", "/etc/slurm/slurm.conf"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
        for _ in range(25):
            if slurmd_pid() is not None:
                return
            time.sleep(0.2)


def node_states() -> list[str]:
    """"NAME state" per node, the state being slurmctld's State= in lower case
    ("idle", "idle+drain", "down+not_responding"): `scontrol -o show node`, not sinfo's
    %t/%T, which lagged behind slurmctld after a node came back (tests/cluster's Bed)."""
    lines = []
    for line in run(["scontrol", "-o", "show", "node"], check=False).stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            lines.append(f"{fields['NodeName']} {fields.get('State', 'unknown').lower()}")
    return lines


@dataclass
class Job:
    name: str
    image: str
    kind: str  # "plain" | "scancel" | "kill" | "timeout" | "slurmd" | "burst"
    job_id: str = ""
    state: str = ""
    submitted: float = 0.0
    disturbed: bool = False


@dataclass
class Soak:
    n: int
    k: int
    seed: int
    work: Path
    rng: random.Random = field(init=False)
    images: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=lambda: {"scancel": 0, "scancel_kill": 0, "time_limit": 0, "slurmd_kill9": 0})
    submit_refused: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- setup ----------------------------------------------------------------------------
    def make_images(self) -> None:
        base = self.work / "base.oci.sif"
        run([sys.executable, str(LAYOUT_SCRIPT), str(self.work / "busybox-layout")])
        run([SIFOVERLAY, "import", str(self.work / "busybox-layout"), str(base)])
        run([SIFOVERLAY, "overlay", "create", "--sparse", "--size", "64", str(base)],
            env=dict(os.environ, SIFOVERLAY_JOURNAL_DIR=JOURNAL_DIR))
        # a directory the jobs' user may write (the overlay's root belongs to root)
        run([SIFOVERLAY, "exec", "--allow-root-options", "--writable", "--base-dir", str(self.work / "run"), "--journal-dir", JOURNAL_DIR,
             str(base), "--", "/bin/sh", "-c", f"mkdir /soak && chown {SOAK_UID}:{SOAK_UID} /soak"])
        for i in range(self.k):
            path = self.work / f"img{i}.oci.sif"
            run(["cp", "--sparse=always", str(base), str(path)])
            self.images.append(str(path))
        base.unlink()
        run(["chown", "-R", f"{SOAK_USER}:{SOAK_USER}", str(self.work)])

    # -- jobs -----------------------------------------------------------------------------
    def script(self, job: Job, steps: int) -> str:
        """Appends to NAME.partial in `steps` 0.5 s steps (a kill lands mid-write), then
        writes NAME (content: NAME) via a rename: present iff the job got to its end."""
        return (f"mkdir -p /soak && i=0; while [ $i -lt {steps} ]; do echo {job.name}-$i >> /soak/{job.name}.partial; "
                f"sleep 0.5; i=$((i+1)); done; echo {job.name} > /soak/{job.name}.tmp && mv /soak/{job.name}.tmp /soak/{job.name}")

    def submit(self, job: Job, steps: int, time_limit_min: int = 5) -> None:
        proc = as_user(SOAK_USER, ["sbatch", "--parsable", "-J", job.name, "-o", "/dev/null", "-t", str(time_limit_min),
                                   f"--oci-sif-overlay={job.image}", "--wrap", self.script(job, steps)],
                       check=False, cwd="/tmp")
        job.submitted = time.monotonic()
        if proc.returncode != 0:
            job.state = "SUBMIT_REFUSED"
            self.submit_refused += 1
            return
        job.job_id = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)

    def wait_running(self, job: Job, timeout: float = 120) -> bool:
        """Until the job's script runs: RUNNING and past its Prolog (squeue shows RUNNING
        with reason "Prolog" while the Prolog mounts the image)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = run(["squeue", "--noheader", "--states=all", "--format=%T %r", "--jobs", job.job_id], check=False)
            state, _, reason = proc.stdout.strip().partition(" ")
            if state == "RUNNING" and reason != "Prolog":
                return True
            if state in TERMINAL:
                return False
            time.sleep(0.3)
        return False

    def disturb(self, job: Job) -> None:
        if not self.wait_running(job):
            return
        time.sleep(self.rng.uniform(0.3, 1.5))  # land mid-write
        if job.kind == "scancel":
            run(["scancel", job.job_id], check=False)
            self.kills["scancel"] += 1
        elif job.kind == "kill":
            run(["scancel", "-s", "KILL", job.job_id], check=False)
            self.kills["scancel_kill"] += 1
        elif job.kind == "timeout":
            run(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=0"], check=False)
            self.kills["time_limit"] += 1
        elif job.kind == "slurmd":
            pid = slurmd_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                self.kills["slurmd_kill9"] += 1
                time.sleep(self.rng.uniform(1, 4))
            restart_slurmd()
        job.disturbed = True

    def run_jobs(self) -> None:
        kinds = ["plain"] * 8 + ["scancel", "kill", "timeout"] * 2 + ["burst"] + ["slurmd"]
        first = ["scancel", "kill", "timeout", "slurmd", "burst"]  # every kind at least once
        self.rng.shuffle(first)
        submitted = 0
        while submitted < self.n:
            kind = first.pop() if first else self.rng.choice(kinds)
            image = self.rng.choice(self.images)
            self.wait_idle(image)
            if kind == "burst":  # concurrent submissions on one image: one wins the lease
                count = min(3, self.n - submitted)
                batch = [Job(self.name(), image, "burst") for _ in range(count)]
                for job in batch:
                    self.submit(job, steps=2)
                submitted += count
                continue
            job = Job(self.name(), image, kind)
            # time-limit jobs must outlive the limit check (~30 s); the others are short
            self.submit(job, steps={"plain": 1, "timeout": 180}.get(kind, self.rng.randint(6, 12)))
            submitted += 1
            if kind != "plain" and job.job_id:
                self.disturb(job)

    def wait_idle(self, image: str, timeout: float = 180) -> None:
        """Keep at most one running job per image so later jobs are not all refused,
        and at most 4 jobs in flight overall."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            restart_slurmd()  # whoever killed it, jobs need it
            states = job_states()
            if states is not None:
                for j in self.jobs:
                    seen = states.get(j.job_id)
                    if not j.state and (seen in TERMINAL or seen is None and time.monotonic() - j.submitted > 30):
                        j.state = seen or "GONE"
            live = [j for j in self.jobs if not j.state]
            if len(live) < 4 and not any(j.image == image for j in live):
                return
            time.sleep(0.5)

    def name(self) -> str:
        return f"soak-{self.seed}-{len(self.jobs) + self.submit_refused}-{uuid.uuid4().hex[:6]}"

    def drain(self, timeout: float = 900) -> None:
        """Wait until every job is over, recording each final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            restart_slurmd()
            states = job_states()
            if states is not None:
                for j in self.jobs:
                    if j.job_id in states:
                        j.state = states[j.job_id] if states[j.job_id] in TERMINAL else ""
                    elif not j.state:
                        j.state = "GONE"  # ended more than MinJobAge ago, state never seen
                if all(j.state for j in self.jobs):
                    self.wait_job_ends(deadline)
                    return
            time.sleep(2)
        raise RuntimeError(f"jobs still not over after {timeout}s")

    @staticmethod
    def wait_job_ends(deadline: float) -> None:
        """Jobs over in Slurm may still be ending: their reconcile workers (epilog_reconcile=async)
        hash and commit after the Epilog; wait until none holds a job-end lock."""
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from sifoverlay.slurm.endlock import in_progress

        while in_progress(JOURNAL_DIR, "") and time.monotonic() < deadline:
            time.sleep(0.5)

    # -- verification ---------------------------------------------------------------------
    def read_back(self, image: str, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        proc = run([SIFOVERLAY, "exec", "--allow-root-options", "--base-dir", str(self.work / "run"), "--journal-dir", JOURNAL_DIR,
                    image, "--", "/bin/sh", "-c",
                    "cd /soak 2>/dev/null && for f in *; do case $f in *.*) continue;; esac; echo \"$f=$(cat \"$f\")\"; done"],
                   check=False, timeout=120)
        found = {}
        for line in proc.stdout.splitlines():
            key, _, value = line.partition("=")
            found[key] = value
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="jobs to submit (default 200)")
    parser.add_argument("--k", type=int, default=5, help="images (default 5)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--cluster-wait", type=float, default=1800, help="seconds to poll for the cluster")
    parser.add_argument("--keep", action="store_true", help="keep the images")
    parser.add_argument("--json-out", help="also write the JSON result here")
    parser.add_argument("--nodes", type=int, default=1,
                        help="more than 1: the multi-node soak on the test bed (bench/soak_cluster.py)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py: needs root (Slurm daemons, demo user, mounts)", file=sys.stderr)
        return 2
    if args.nodes > 1:
        sys.path.insert(0, str(REPO / "bench"))
        import soak_cluster

        return soak_cluster.main(args)
    start = time.monotonic()
    cluster_ready(args.cluster_wait)
    ensure_user(SOAK_USER, SOAK_UID)
    IMAGE_ROOT.mkdir(parents=True, exist_ok=True)
    work = IMAGE_ROOT / f"soak-{args.seed}-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    soak = Soak(args.n, args.k, args.seed, work)
    try:
        soak.make_images()
        soak.run_jobs()
        soak.drain()
        sweep = run([SIFOVERLAY, "recover", "--slurm", "--json"], check=False, timeout=600,
                    env=dict(os.environ, SIFOVERLAY_JOURNAL_DIR=JOURNAL_DIR))
        result = verify(soak, sweep)
    finally:
        leftover = [j.job_id for j in soak.jobs if j.job_id and j.state not in TERMINAL]
        if leftover:  # only after an error: never leave our jobs on the shared cluster
            run(["scancel", *leftover], check=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if result["ok"] else 1


def sweeper_outcomes(sweep: subprocess.CompletedProcess[str]) -> dict[str, int]:
    try:
        report = json.loads(sweep.stdout)
    except ValueError:
        return {"unparsable": 1}
    counts: dict[str, int] = {}
    for outcome in report.get("slurm", {}).get("outcomes", []) + report.get("outcomes", []):
        key = str(outcome.get("outcome") or outcome.get("result") or "?")
        counts[key] = counts.get(key, 0) + 1
    return counts


def settle_node() -> str:
    """The node's state; a drained/down node is resumed (the cluster is shared) and
    reported as found."""
    states = [line.split()[-1] for line in node_states() if line.strip()]
    state = states[0] if states else "unknown"
    if any(bad in state for bad in ("drain", "down", "fail")):
        for line in node_states():
            if line.strip():
                run(["scontrol", "update", f"NodeName={line.split()[0]}", "State=RESUME"], check=False)
    return state


def verify(soak: Soak, sweep: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    node_state = settle_node()
    states: dict[str, int] = {}
    for job in soak.jobs:
        states[job.state] = states.get(job.state, 0) + 1
    images_ok, files_expected, files_verified, drift, problems = 0, 0, 0, {}, []
    for image in soak.images:
        check = check_image(image)
        if check["ok"]:
            images_ok += 1
        else:
            problems += [f"{image}: {p}" for p in check["problems"]]
        status = run([SIFOVERLAY, "overlay", "status", "--verify", "--json", image], check=False,
                     env=dict(os.environ, SIFOVERLAY_JOURNAL_DIR=JOURNAL_DIR))
        state = json.loads(status.stdout)["state"] if status.stdout.strip() else f"error: {status.stderr.strip()}"
        drift[state] = drift.get(state, 0) + 1
        if state != "clean":
            problems.append(f"{image}: drift state {state}")
        completed = [j.name for j in soak.jobs if j.image == image and j.state == "COMPLETED"]
        files_expected += len(completed)
        found = soak.read_back(image, completed)
        for name in completed:
            if found.get(name) == name:
                files_verified += 1
            else:
                problems.append(f"{image}: file /soak/{name} of a COMPLETED job is {found.get(name)!r}")
    if any(bad in node_state for bad in ("drain", "down", "fail")):
        problems.append(f"node was {node_state} at the end (resumed)")
    return {
        "ok": not problems and files_verified == files_expected and images_ok == len(soak.images),
        "n": soak.n, "k": soak.k, "seed": soak.seed,
        "jobs_submitted": len(soak.jobs) + soak.submit_refused,
        "jobs_by_state": states,
        "kills": soak.kills,
        "bursts": sum(1 for j in soak.jobs if j.kind == "burst"),
        "images_checked": len(soak.images), "images_consistent": images_ok,
        "files_expected": files_expected, "files_verified": files_verified,
        "drift_states": drift,
        "sweeper_exit": sweep.returncode,
        "sweeper_outcomes": sweeper_outcomes(sweep),
        "node_state_at_end": node_state,
        "problems": problems[:20],
    }


if __name__ == "__main__":
    sys.exit(main())
