"""`sifoverlay log IMAGE`: the image's revisions, newest first (like `git log`)."""

from __future__ import annotations

import argparse
from typing import Any

from sifoverlay.cli.output import add_json_flag, print_json, write_text

HELP = "show the revision history of an image (which job changed it, when, from which digest)"


def register(sub: Any) -> None:
    parser = sub.add_parser("log", help=HELP, description=HELP + ". Newest first.")
    parser.add_argument("image", metavar="IMAGE", help="OCI-SIF file")
    parser.add_argument("-n", "--max-count", type=int, default=None, metavar="N", help="show at most N revisions")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _short(digest: Any) -> str:
    return str(digest)[:19] if digest else "-"


def _who(who: dict[str, Any]) -> str:
    parts = []
    if who.get("job_id"):
        parts.append(f"job {who['job_id']}" + (f" on {who['cluster']}" if who.get("cluster") else ""))
    user = who.get("user") or "?"
    parts.append(f"user {user} (uid {who.get('uid')})")
    if who.get("node"):
        parts.append(f"node {who['node']}")
    if who.get("exit_state"):
        parts.append(f"exit {who['exit_state']}")
    if who.get("via"):
        parts.append(f"via {who['via']}")
    return ", ".join(parts)


def format_revision(rev: dict[str, Any]) -> str:
    overlay = rev.get("overlay") or {}
    manifest = rev.get("manifest") or {}
    who = rev.get("who") if isinstance(rev.get("who"), dict) else {}
    lines = [
        f"revision {rev.get('seq')}  {rev.get('op')}  {rev.get('time')}",
        f"Who:      {_who(who)}",
        f"Overlay:  {_short(overlay.get('old'))} -> {_short(overlay.get('new'))}",
        f"Manifest: {_short(manifest.get('old'))} -> {_short(manifest.get('new'))}",
        f"Hashed:   {rev.get('bytes_hashed')} bytes",
    ]
    detail = rev.get("detail")
    if isinstance(detail, dict) and detail:
        lines.append("Detail:   " + ", ".join(f"{k}={v}" for k, v in sorted(detail.items())))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sifoverlay.engine.history import read_log
    from sifoverlay.errors import UsageError

    if args.max_count is not None and args.max_count < 0:
        raise UsageError(args.image, f"--max-count must not be negative, got {args.max_count}")
    found = read_log(args.image)
    revisions = found.newest_first()
    if args.max_count is not None:
        revisions = revisions[: args.max_count]
    if args.json:
        data: dict[str, Any] = {"image": args.image, "dropped": found.dropped, "revisions": revisions}
        if found.lost:
            data["lost"] = found.lost
        print_json(data)
        return 0
    blocks = [format_revision(rev) for rev in revisions]
    if found.lost:
        blocks.append(f"(older history was unreadable and started afresh: {found.lost})")
    if found.dropped and (args.max_count is None or args.max_count > len(revisions)):
        blocks.append(f"({found.dropped} older revisions dropped by the cap)")
    if not blocks:
        blocks.append(f"{args.image}: no revisions recorded")
    write_text("\n\n".join(blocks) + "\n")
    return 0
