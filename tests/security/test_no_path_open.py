"""Guard (issue 12, "one rule in one place"): root-side code never opens a file by a path
the image owner could influence. Every open() / os.open() / io.open() in the root-side
modules must be one of:

  * an open of a procfs/sysfs path (a string or f-string starting with /proc/ or /sys/),
    including /proc/self/fd/N reopens of a descriptor already checked;
  * a checked open: its flags mention O_NOFOLLOW (the helpers in sifoverlay.fsio add
    O_NONBLOCK and the S_ISREG check: `open_regular`, `open_beneath`, `open_dir_nofollow`);
  * an entry of ALLOWED below, each with its reason.

The checked helpers themselves (sifoverlay/fsio.py) are the one place that calls
os.open on names, always relative to a directory fd resolved without symlinks or with
O_NOFOLLOW. A new bare open() in these modules fails this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
ROOT_SIDE = sorted(
    [p for p in (REPO / "sifoverlay" / "engine").glob("*.py")]
    + [p for p in (REPO / "sifoverlay" / "slurm").glob("*.py")]
    + [REPO / "sifoverlay" / "runtime" / "embedded.py", REPO / "sifoverlay" / "sif" / "load.py"]
)

# (file relative to the repo, enclosing function) -> why a path open is safe there.
ALLOWED: dict[tuple[str, str], str] = {
    ("sifoverlay/slurm/config.py", "_plugin_line"):
        "plugstack.conf and its includes: root's Slurm configuration in /etc, not user-controlled",
    ("sifoverlay/engine/quiesce.py", "_read"):
        "callers pass /proc/<pid>/... and /sys/block/loopN/... paths only",
    ("sifoverlay/engine/procs.py", "mountinfo"):
        "default /proc/self/mountinfo; callers pass /proc/<pid>/mountinfo only",
    ("sifoverlay/slurm/authorize.py", "_open_as_user"):
        "runs in a child that has dropped to the job user's uid/gids: the user's own view is the point; "
        "O_NOFOLLOW is in `flags` and the result is only compared with root's checked fd",
    ("sifoverlay/engine/journal.py", "read_entry"):
        "no path open: os.fdopen of a dup of an open_regular() fd",
    ("sifoverlay/engine/sessions.py", "_read_regular"):
        "no path open: os.fdopen of an open_regular() fd",
    ("sifoverlay/slurm/endlock.py", "take"):
        "the job-end lock in root's sessions directory (journal_dir, root-owned): O_NOFOLLOW|O_NONBLOCK, "
        "the name built from a checked job id and host",
    ("sifoverlay/slurm/endlock.py", "in_progress"):
        "probes the job-end locks in root's sessions directory: O_RDONLY|O_NOFOLLOW|O_NONBLOCK",
    ("sifoverlay/slurm/phases.py", "records_of_job"):
        "reads the timing log for tests and benchmarks (root's /var/log/sifoverlay), never user paths",
    ("sifoverlay/slurm/phases.py", "record"):
        "appends to timing.jsonl in root's log directory (/var/log/sifoverlay): O_NOFOLLOW",
    ("sifoverlay/slurm/prolog.py", "_become_mounter"):
        "os.devnull (/dev/null), a constant: the detached mounter's stdin/stdout/stderr",
    ("sifoverlay/sif/load.py", "open"):
        "SifFile.open: O_NOFOLLOW|O_NONBLOCK is in `flags`, S_ISREG checked by from_fd; root-side code "
        "uses statedir.open_image_checked + SifFile.from_fd instead",
}

OPEN_NAMES = {"open"}


def _is_open_call(node: ast.Call) -> bool:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in ("open", "fdopen") and func.id == "open"
    if isinstance(func, ast.Attribute) and func.attr == "open":
        base = func.value
        # os.open, io.open, self.io.open, self._io.open, (io or REAL_IO).open, REAL_IO.open
        names = {n.id for n in ast.walk(base) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(base) if isinstance(n, ast.Attribute)}
        return bool(names & {"os", "io", "_io", "REAL_IO"})
    return False


def _literal_prefix(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _mentions(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == name or isinstance(n, ast.Name) and n.id == name
               for n in ast.walk(node))


def _function_of(tree: ast.Module) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(fn):
                owner.setdefault(inner, fn.name) if inner is not fn else None
    # innermost function wins: re-walk nested definitions last
    for fn in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                     key=lambda f: f.lineno):
        for inner in ast.walk(fn):
            if inner is not fn:
                owner[inner] = fn.name
    return owner


def findings() -> list[str]:
    out = []
    for path in ROOT_SIDE:
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(), filename=rel)
        owner = _function_of(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not _is_open_call(node) or not node.args:
                continue
            first = node.args[0]
            prefix = _literal_prefix(first)
            if prefix is not None and (prefix.startswith("/proc/") or prefix.startswith("/sys/")):
                continue
            flags = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "flags"), None)
            if flags is not None and _mentions(flags, "O_NOFOLLOW"):
                continue
            if (rel, owner.get(node, "<module>")) in ALLOWED:
                continue
            out.append(f"{rel}:{node.lineno}: {ast.unparse(node)[:100]} (in {owner.get(node, '<module>')})")
    return out


def test_root_side_code_never_opens_a_path_unchecked() -> None:
    found = findings()
    assert not found, "path opens in root-side modules (use sifoverlay.fsio.open_regular/open_beneath, " \
        "engine.statedir.open_image_checked, or justify in ALLOWED):\n" + "\n".join(found)


def test_allowlist_entries_still_match_something() -> None:
    """An allowlist entry whose function no longer exists is stale: remove it."""
    defined = set()
    for path in ROOT_SIDE:
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defined.add((rel, node.name))
    assert set(ALLOWED) <= defined, sorted(set(ALLOWED) - defined)


def test_the_guard_catches_a_bare_open(tmp_path: Path) -> None:
    """The scanner is not vacuous: a bare open of a variable path is reported."""
    code = "import os\ndef f(p):\n    return os.open(p, os.O_RDONLY)\n"
    tree = ast.parse(code)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_open_call(n)]
    assert len(calls) == 1 and not _mentions(calls[0].args[1], "O_NOFOLLOW")
