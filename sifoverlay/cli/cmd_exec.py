"""`sifoverlay exec [--writable] [--mount fuse|kernel] [--bind SRC[:DST[:ro]]] IMAGE -- CMD...`

Embedded single-machine mode: lease, assemble, run CMD inside the image as the invoking
user, tear down, reconcile (--writable), release. Exits with CMD's exit code.

Run as root (sudo), the options that reach beyond the caller's own rights - a host path
bound into the container, kernel mounts of a user image, another user, other state
directories, a job id or lease TTL of our choosing - are refused unless the admin says
`--allow-root-options` (docs/security.md, finding 9): granting sudo for `sifoverlay exec`
must never grant root.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

HELP = "run a command inside an OCI-SIF (overlay writable with --writable)"
log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "exec", help=HELP,
        description=HELP + ". Runs as an ordinary user (FUSE mounts + a user namespace; needs /dev/fuse and "
        "unprivileged user namespaces) - no sudo needed. As root (sudo) the command runs as the invoking user "
        "(SUDO_UID/SUDO_GID), and the options that reach beyond the caller's rights need --allow-root-options. "
        "Changes are discarded unless --writable.",
    )
    parser.add_argument("--writable", "-w", action="store_true", help="mount the ext3 overlay read-write and reconcile after")
    parser.add_argument("--mount", choices=("fuse", "kernel"), default="fuse",
                        help="fuse (default: FUSE daemons as the user) or kernel (trusted images only)")
    parser.add_argument("--bind", "-B", action="append", default=[], metavar="SRC[:DST[:ro|rw]][,...]",
                        help="bind host paths (pyxis --container-mounts syntax; repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE|NAME",
                        help="set NAME inside (wins over everything), or keep the caller's NAME over the image's")
    parser.add_argument("--cleanenv", "-e", action="store_true",
                        help="start from a clean environment (only HOME, USER, TERM, LANG, LC_*, SLURM_*, ...)")
    parser.add_argument("--pwd", "--workdir", dest="workdir", metavar="DIR",
                        help="working directory inside (must exist; default: the current directory if it "
                        "exists inside, else the image's WorkingDir, else /)")
    parser.add_argument("--no-home", action="store_true", help="do not bind $HOME")
    parser.add_argument("--no-host-files", action="store_true",
                        help="leave the image's /etc/passwd, /etc/group, /etc/hosts and /etc/resolv.conf alone")
    parser.add_argument("--nv", action="store_true",
                        help="NVIDIA GPUs: bind the host driver's libraries and tools (ldconfig cache + a list), as "
                        "SingularityCE --nv does. Which /dev/nvidiaN are shown follows the allocation "
                        "(SLURM_STEP_GPUS/SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES), with or without --nv")
    parser.add_argument("--user", "-u", metavar="USER|UID|UID:GID", help="run as this user (root only)")
    parser.add_argument("--job-id", help="job id for the lease, session and runtime dir (default exec-HOST-PID)")
    parser.add_argument("--base-dir", help="runtime directory (default $SIFOVERLAY_RUNTIME_DIR or /run/sifoverlay/jobs)")
    parser.add_argument("--journal-dir", help="journal directory (default: see `sifoverlay recover`)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait up to SECONDS for a busy image instead of failing at once (exit 75)")
    parser.add_argument("--no-sync", action="store_true", help="do not reconcile after a --writable run")
    parser.add_argument("--lease-ttl", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--allow-root-options", action="store_true",
                        help="as root: accept --bind, --mount kernel, --user, --job-id, --base-dir, --journal-dir, "
                        "--lease-ttl and $SIFOVERLAY_*_DIR (refused otherwise; for an admin running this on purpose)")
    parser.add_argument("image", metavar="IMAGE", help="OCI-SIF image")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD", help="command and arguments")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.errors import NotAuthorized, UsageError
    from sifoverlay.runtime import run_embedded
    from sifoverlay.runtime.embedded import JobOptions
    from sifoverlay.runtime.environment import EnvOptions
    from sifoverlay.runtime.jobview import ViewRequest, parse_binds

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(None, "no command given: sifoverlay exec IMAGE -- CMD [ARGS...]")
    if os.geteuid() != 0:  # unprivileged: FUSE as ourselves, the command in our own user namespace
        if args.mount == "kernel":
            raise NotAuthorized(args.image, "--mount kernel needs root (an unprivileged exec mounts with FUSE)")
        if args.user is not None and resolve_user(args.user).uid != os.getuid():
            raise NotAuthorized(args.image, "--user needs root (an unprivileged exec runs as its caller)")
    refused = root_only_options(args, os.environ) if os.geteuid() == 0 else []
    if refused and not args.allow_root_options:
        raise NotAuthorized(args.image, f"as root, {', '.join(refused)} {'is' if len(refused) == 1 else 'are'} "
                                        "refused (they reach beyond the caller's rights); an admin who means it "
                                        "adds --allow-root-options")
    user = resolve_user(args.user)
    here = os.getcwd()
    binds = [b for spec in args.bind for b in parse_binds(spec, what="--bind", cwd=here)]
    options = JobOptions(ViewRequest(home=not args.no_home, host_files=not args.no_host_files), EnvOptions.parse(args.env, clean=args.cleanenv),
                         args.workdir, args.nv)
    outcome = run_embedded(
        args.image, argv, user=user, writable=args.writable, mode=args.mount, binds=binds, cwd=here, options=options,
        job_id=args.job_id, base_dir=args.base_dir, journal_dir=args.journal_dir, lease_ttl=args.lease_ttl,
        lease_wait=args.wait, sync=not args.no_sync,
    )
    if outcome.sync_error:
        print(f"sifoverlay: {args.image}: not reconciled: {outcome.sync_error}", file=sys.stderr)
    return outcome.returncode


# (option, is it in use?) for the options only an admin may use as root
_ROOT_ONLY = (
    ("--bind", lambda a, env: bool(a.bind)),
    ("--mount kernel", lambda a, env: a.mount == "kernel"),
    ("--user", lambda a, env: a.user is not None),
    ("--job-id", lambda a, env: a.job_id is not None),
    ("--base-dir", lambda a, env: a.base_dir is not None),
    ("--journal-dir", lambda a, env: a.journal_dir is not None),
    ("--lease-ttl", lambda a, env: a.lease_ttl != 60.0),
)


def root_only_options(args: argparse.Namespace, env: Any) -> list[str]:
    """The admin-only options this invocation uses, and every state-directory override in
    the environment ($SIFOVERLAY_*_DIR: runtime, journal, lease state)."""
    used = [name for name, check in _ROOT_ONLY if check(args, env)]
    return used + sorted(f"${k}" for k, v in env.items() if k.startswith("SIFOVERLAY_") and k.endswith("_DIR") and v)


def resolve_user(spec: str | None) -> Any:
    """--user NAME|UID, else the sudo caller, else ourselves."""
    import pwd

    from sifoverlay.errors import UsageError
    from sifoverlay.runtime import User

    if spec is None and os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        spec = os.environ["SUDO_UID"]
    if spec is None:
        uid, gid = os.getuid(), os.getgid()
        return User(uid, gid, tuple(sorted(set(os.getgroups()) | {gid})))
    uid_text, sep, gid_text = spec.partition(":")
    if sep and uid_text.isdigit() and gid_text.isdigit():  # UID:GID (the k8s operator): exactly these ids
        return User(int(uid_text), int(gid_text), (int(gid_text),))
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        if spec.isdigit():  # an id without a passwd entry: its own group only
            return User(int(spec), int(spec), (int(spec),))
        raise UsageError(None, f"unknown user {spec!r}") from None
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return User(entry.pw_uid, entry.pw_gid, tuple(sorted(set(groups))))
