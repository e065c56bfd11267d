"""`sifoverlay overlay create|status|sync|seal`: the writable overlay of an OCI-SIF.

Imports only argparse and the stdlib-only `cli.output` at module level: the engine is
imported inside `run`, so that a no-op `overlay sync` costs little more than reading the
header, table, JSON and the ext3 superblock.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from sifoverlay.cli.output import ProgressBar, add_json_flag, hashing_text, print_json, progress, write_text

HELP = "create, inspect, reconcile or seal the writable ext3 overlay of an OCI-SIF"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="OCI-SIF file")
    add_json_flag(parser)
    parser.add_argument(
        "--journal-dir", metavar="DIR", default=None,
        help="journal directory (default: $SIFOVERLAY_JOURNAL_DIR, /var/lib/sifoverlay/journal "
        "for root, else $XDG_STATE_HOME/sifoverlay/journal)",
    )


TEXTFILE_ENV = "SIFOVERLAY_TEXTFILE_DIR"  # = sifoverlay.metrics.record.ENV_TEXTFILE_DIR (not imported, same reason)
MIN_SIZE_MIB = 64  # = sifoverlay.ext3.MIN_OVERLAY_MIB (not imported: keeps `overlay sync` start cheap)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(\d{1,12})(?:\.(\d{1,6}))?\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`--size` in MiB: a plain number is MiB; K, M, G, T (optionally KiB/KB...) are
    binary units. The result must be a whole number of MiB."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 64, 64M, 1G)")
    whole, fraction, unit = match.groups()
    scale = _UNITS[unit.upper()]
    numerator = int(whole + (fraction or "")) * scale
    denominator = 10 ** len(fraction or "")
    if numerator % (denominator << 20):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB")
    return numerator // (denominator << 20)


MAX_SIZE_MIB = 16 << 20  # ext3 with 4 KiB blocks: 16 TiB


def _existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_room(image: str, size_mib: int, *, sparse: bool) -> None:
    """Refuse, before anything is staged, an overlay that cannot be made: over ext3's
    16 TiB, or (allocated, not --sparse) more than the free space where it is written
    (the engine's scratch directory, then appended to the image: twice on one filesystem)."""
    from sifoverlay.engine import statedir
    from sifoverlay.errors import UsageError

    if size_mib > MAX_SIZE_MIB:
        raise UsageError(image, f"overlay size {size_mib} MiB is over ext3's limit of {MAX_SIZE_MIB} MiB (16 TiB)")
    if sparse:
        return
    need: dict[int, tuple[int, str]] = {}
    for where in (os.path.dirname(os.path.abspath(image)), _existing(statedir.scratch_dir())):
        try:
            device = os.stat(where).st_dev
        except OSError:
            continue  # the engine reports what it cannot use
        total, _ = need.get(device, (0, where))
        need[device] = (total + (size_mib << 20), where)
    for total, where in need.values():
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        if total > free:
            raise UsageError(image, f"a {size_mib} MiB overlay needs {total >> 20} MiB free in {where}, "
                                    f"only {free >> 20} MiB are (use --sparse to allocate on write)")


def register(sub: Any) -> None:
    parser = sub.add_parser("overlay", help=HELP, description=HELP + ".")
    verbs = parser.add_subparsers(dest="overlay_command", metavar="VERB", parser_class=type(parser))
    verbs.required = True

    create = verbs.add_parser("create", help="add an empty ext3 overlay as the last layer",
                              description="Add an empty ext3 overlay (upper/, work/) as the last layer of IMAGE.")
    create.add_argument("--size", type=parse_size, default=64, metavar="SIZE",
                        help="overlay size: MiB, or with a unit as SingularityCE takes it (64, 64M, 1G; >= 64 MiB, "
                        "default 64)")
    create.add_argument("--sparse", action="store_true", help="leave the overlay sparse instead of allocating it")
    _common(create)
    create.set_defaults(func=run, verb="create")

    status = verbs.add_parser("status", help="drift of the overlay against its recorded digest",
                              description="Report clean / modified / drift / in-use / unknown. Read-only.")
    group = status.add_mutually_exclusive_group()
    group.add_argument("--verify", dest="verify", action="store_const", const=True, default=None,
                       help="always hash the overlay")
    group.add_argument("--no-verify", dest="verify", action="store_const", const=False,
                       help="never hash (an overlay without fingerprint stays 'unknown')")
    _common(status)
    status.set_defaults(func=run, verb="status", defer_logging=True)  # the memo path logs nothing

    sync = verbs.add_parser("sync", help="record the overlay's current digest (crash-safe)",
                            description="Reconcile the OCI metadata of IMAGE with its overlay bytes.")
    sync.add_argument("--force-hash", action="store_true", help="hash even if the fingerprint is unchanged")
    sync.add_argument("--job", metavar="ID", default=None, help="run inside the lease of job ID")
    sync.add_argument("--textfile-dir", metavar="DIR", default=None,
                      help="count this reconcile in DIR/sifoverlay_events.prom for node_exporter's textfile "
                      "collector (default: $SIFOVERLAY_TEXTFILE_DIR, else none; see docs/metrics.md)")
    _common(sync)
    sync.set_defaults(func=run, verb="sync", defer_logging=True)  # the no-op memo path logs nothing

    resize = verbs.add_parser("resize", help="grow (or shrink, never below the used space) the overlay",
                              description="Resize the ext3 overlay of IMAGE (crash-safe: resized on a copy, then "
                              "committed).")
    resize.add_argument("--size", type=parse_size, required=True, metavar="SIZE",
                        help="new overlay size: MiB, or with a unit as in `overlay create` (64, 512M, 2G; >= 64 MiB)")
    _common(resize)
    resize.set_defaults(func=run, verb="resize")

    compact = verbs.add_parser("compact", help="give the space of deleted files back (punch free ext3 blocks)",
                               description="Punch the free blocks of the overlay out of IMAGE's allocation and "
                               "record the new digest (crash-safe).")
    _common(compact)
    compact.set_defaults(func=run, verb="compact")

    seal = verbs.add_parser("seal", help="turn upper/ into a squashfs layer replacing the overlay",
                            description="Convert the overlay's upper/ into a squashfs layer (crash-safe).")
    _common(seal)
    seal.set_defaults(func=run, verb="seal")


def status_text(st: dict[str, Any]) -> str:
    """The text of `overlay status` from Status.as_dict() (the full path's or the memo's)."""
    lines = [f"{st['image']}: {st['state']}", f"  recorded digest: {st['recorded_digest']}"]
    if st["actual_digest"]:
        lines.append(f"  actual digest:   {st['actual_digest']}")
    lines.append(f"  overlay: {st['overlay_size']} bytes at offset {st['overlay_offset']}, {st['free_bytes']} bytes free")
    if st["capacity"]:
        cap = st["capacity"]
        lines.append(f"  free: {cap['free_bytes']} bytes ({cap['available_bytes']} for users), "
                     f"{cap['free_inodes']} of {cap['inodes']} inodes, {cap['descriptors_free']} of "
                     f"{cap['descriptors_total']} descriptor slots (a sync needs {cap['slots_per_sync']})")
    if st["holder"]:
        lines.append(f"  in use: {st['holder']['detail']}")
    if st["journal_pending"]:
        lines.append(f"  unfinished operations: {st['journal_pending']} (run `sifoverlay recover`)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with progress("hashing overlay", quiet=args.json, render=hashing_text) as bar:
        data, text = _do(args, bar)
    if args.json:
        print_json(data)
    else:
        write_text(text + "\n")
    return 0


def _do(args: argparse.Namespace, bar: ProgressBar | None) -> tuple[dict[str, Any], str]:
    from sifoverlay.fsio import io_from_env

    verb = args.verb
    if verb == "sync":
        metrics = args.textfile_dir is not None or bool(os.environ.get(TEXTFILE_ENV))
        if not args.force_hash and not metrics:  # issue 17: a no-op without loading the engine
            import time

            from sifoverlay.engine import noopmemo

            started = time.monotonic()
            digest = noopmemo.recorded_noop(args.image, args.journal_dir)
            if digest is not None:
                return (noopmemo.noop_result(args.image, digest, time.monotonic() - started),
                        f"{args.image}: noop ({digest})")
        getattr(args, "setup_logging", lambda: None)()
        from sifoverlay.engine.reconcile import sync

        def run_sync() -> Any:
            return sync(args.image, job=args.job, journal_dir=args.journal_dir, io=io_from_env(), progress=bar,
                        force_hash=args.force_hash, remember_noop=True)

        if not metrics:
            result = run_sync()  # no metrics asked for: sifoverlay.metrics stays unimported
        else:
            from sifoverlay.metrics.record import recording

            with recording(args.textfile_dir, "sync") as rec:  # counts the result or the error
                result = rec.outcome = run_sync()
        return result.as_dict(), f"{result.image}: {result.action} ({result.new_digest})"
    if verb == "status":
        from sifoverlay.engine import statusmemo

        data = None
        if not getattr(args, "verbose", 0):  # -v: the engine's log is asked for
            data = statusmemo.cached_status(args.image, verify=args.verify, journal_dir=args.journal_dir)
        if data is None:  # issue 17: the memo answers only what this full path would
            getattr(args, "setup_logging", lambda: None)()
            from sifoverlay.engine.status import status

            data = status(args.image, verify=args.verify, journal_dir=args.journal_dir, progress=bar,
                          remember=True).as_dict()
        return data, status_text(data)
    if verb == "create":
        from sifoverlay.engine.create import create_overlay
        from sifoverlay.errors import UsageError

        if args.size < MIN_SIZE_MIB:  # checked before anything is staged
            raise UsageError(args.image, f"overlay size must be at least {MIN_SIZE_MIB} MiB, got {args.size} MiB")
        check_room(args.image, args.size, sparse=args.sparse)

        op = create_overlay(args.image, size_mib=args.size, sparse=args.sparse, journal_dir=args.journal_dir,
                            io=io_from_env())
        return op.as_dict(), f"{op.image}: overlay created ({op.layer_size} bytes, {op.layer_digest})"
    if verb == "resize":
        from sifoverlay.engine.resize import resize

        if args.size < MIN_SIZE_MIB:
            from sifoverlay.errors import UsageError

            raise UsageError(args.image, f"overlay size must be at least {MIN_SIZE_MIB} MiB, got {args.size} MiB")
        op = resize(args.image, size_mib=args.size, journal_dir=args.journal_dir, io=io_from_env())
        if op.action == "unchanged":
            return op.as_dict(), f"{op.image}: overlay already {op.layer_size} bytes"
        return op.as_dict(), f"{op.image}: overlay resized to {op.layer_size} bytes ({op.layer_digest})"
    if verb == "compact":
        from sifoverlay.engine.compact import compact

        done = compact(args.image, journal_dir=args.journal_dir, io=io_from_env())
        return done.as_dict(), (f"{done.image}: {done.action}, {done.punched_bytes} bytes punched, allocated "
                                f"{done.blocks_before * 512} -> {done.blocks_after * 512} bytes")
    from sifoverlay.engine.seal import seal

    op = seal(args.image, journal_dir=args.journal_dir, io=io_from_env())
    return op.as_dict(), f"{op.image}: overlay sealed into squashfs layer {op.layer_digest}"
