"""`sifoverlay recover [IMAGE ...] [--journal-dir DIR] [--json]`: finish or roll back every
interrupted create / sync / seal (all images with journal entries when none is named),
then clean up the `sifoverlay exec` runs of this host that died (runtime.reclaim: mounts
and FUSE daemons, then the sync, the lease and the session).

Exit status: 0 when everything was recovered (or nothing was pending), 1 when an entry
could not be recovered (it is kept; the outcome says why).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sifoverlay.cli.output import add_json_flag, print_json

HELP = "finish or roll back interrupted overlay operations"


def register(sub: Any) -> None:
    parser = sub.add_parser("recover", help=HELP, description=HELP + " (idempotent, crash-safe).")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="images to recover (default: all with pending entries)")
    add_json_flag(parser)
    parser.add_argument("--journal-dir", metavar="DIR", default=None, help="journal directory (default: see `overlay sync --help`)")
    parser.add_argument("--textfile-dir", metavar="DIR", default=None,
                        help="count the outcomes in DIR/sifoverlay_events.prom for node_exporter's textfile "
                        "collector (default: $SIFOVERLAY_TEXTFILE_DIR, else none; see docs/metrics.md)")
    parser.add_argument("--slurm", action="store_true",
                        help="also finish the Slurm jobs that are over but whose Epilog never ran "
                             "(this node's open job sessions; see docs/slurm.md)")
    parser.add_argument("--plugstack", metavar="FILE", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=("auto", "cli", "pyslurm"), default="auto", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.engine.recover import recover
    from sifoverlay.fsio import io_from_env

    if args.slurm:  # the Slurm sweeper runs first, then the plain recover (it counts its own metrics)
        from sifoverlay.slurm.sweeper import recover_slurm

        return recover_slurm(args, recover=recover, io=io_from_env())

    from sifoverlay.metrics.record import recording

    with recording(args.textfile_dir, "recover") as rec:
        outcomes = rec.outcome = recover(args.images or None, journal_dir=args.journal_dir, io=io_from_env())
    runs = _reclaim_dead_execs(args)  # SIGKILLed `sifoverlay exec` runs of this host (runtime.reclaim)
    if args.json:
        print_json({"outcomes": [o.as_dict() for o in outcomes], **({"exec_runs": [r.as_dict() for r in runs]}
                                                                    if runs else {})})
    else:
        if not outcomes and not runs:
            sys.stdout.write("nothing to recover\n")
        for o in outcomes:
            sys.stdout.write(f"{o.image}: {o.outcome}" + (f" ({o.op})" if o.op else "") + f": {o.detail}\n")
        for r in runs:
            sys.stdout.write(f"{r.image}: exec {r.job_id} {r.result}" + (f" at {r.step}: {r.detail}" if r.detail else "")
                             + "\n")
    return 1 if any(o.outcome == "failed" for o in outcomes) or any(r.result == "failed" for r in runs) else 0


def _reclaim_dead_execs(args: argparse.Namespace) -> list[Any]:
    import os

    from sifoverlay.engine.journal import default_journal_dir
    from sifoverlay.fsio import io_from_env
    from sifoverlay.runtime import reclaim

    journal = args.journal_dir or default_journal_dir()
    if args.images:
        wanted = {os.path.abspath(i) for i in args.images}
        dead = [s for s in reclaim.dead_exec_sessions(journal) if s.image in wanted]
        return [reclaim.reclaim_session(s, journal, io=io_from_env()) for s in dead]
    return reclaim.reclaim(journal, io=io_from_env())
