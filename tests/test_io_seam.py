"""Guard: every mutating file operation in the package goes through sifoverlay.fsio.

Scans sifoverlay/**/*.py (except fsio.py itself) for direct writes, truncates, renames,
unlinks, mkdirs, fsyncs and write-mode opens. A justified exception carries the comment
`# io-seam: exempt (<reason>)` on one of the call's lines.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "sifoverlay"
SEAM = PACKAGE / "fsio.py"

# The brief's list plus their close relatives that the seam also covers (rmdir ~ unlink,
# fdatasync ~ fsync, link/symlink, chmod). chown & co have no seam equivalent: not flagged.
OS_MUTATORS = frozenset(
    {
        "write", "pwrite", "pwritev", "writev", "ftruncate", "truncate", "rename", "replace", "renames",
        "unlink", "remove", "removedirs", "rmdir", "mkdir", "makedirs", "fsync", "fdatasync",
        "link", "symlink", "chmod",
    }
)  # fmt: skip
SHUTIL_MUTATORS = frozenset({"move", "rmtree"})
WRITE_FLAGS = frozenset({"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"})
# Path methods whose names cannot be a FileIO call with this many positional arguments.
PATH_ONLY = {"write_text": None, "write_bytes": None, "touch": 0, "mkdir": 0, "unlink": 0, "rmdir": 0,
             "rename": 1, "replace": 1, "symlink_to": None, "hardlink_to": None, "chmod": 1}  # fmt: skip
NOT_PATHS = frozenset({"dataclasses", "str", "bytes"})  # dataclasses.replace(obj, ...) etc.
EXEMPT = re.compile(r"#\s*io-seam:\s*exempt\s*\(\s*[^)\s][^)]*\)")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _mode_writes(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(set(node.value) & set("wax+"))


def _names_in(node: ast.expr) -> set[str]:
    return {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Name))}


def _mode_arg(call: ast.Call, position: int) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value
    return call.args[position] if len(call.args) > position else None


def scan_source(source: str, name: str) -> list[Finding]:
    """Direct mutating calls in `source` that carry no exemption comment."""
    tree = ast.parse(source, filename=name)
    lines = source.splitlines()
    aliases: dict[str, str] = {}  # `from os import rename as rn` -> rn: os.rename
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        what = _classify(node, aliases)
        if what is None:
            continue
        span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
        if any(EXEMPT.search(line) for line in span):
            continue
        findings.append(Finding(name, node.lineno, what))
    return sorted(findings, key=lambda f: (f.path, f.line))


def _classify(call: ast.Call, aliases: dict[str, str]) -> str | None:
    func = call.func
    dotted = None
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("os", "shutil"):
        dotted = f"{func.value.id}.{func.attr}"
    elif isinstance(func, ast.Name) and func.id in aliases:
        dotted = aliases[func.id]
    if dotted:
        module, attr = dotted.split(".", 1)
        if module == "os" and attr in OS_MUTATORS or module == "shutil" and attr in SHUTIL_MUTATORS:
            return f"{dotted}()"
        if dotted == "os.open" and len(call.args) > 1 and _names_in(call.args[1]) & WRITE_FLAGS:
            return "os.open() with write flags"
        if dotted == "os.fdopen" and _mode_writes(_mode_arg(call, 1)):
            return "os.fdopen() in write mode"
        return None
    if isinstance(func, ast.Name) and func.id == "open" and _mode_writes(_mode_arg(call, 1)):
        return "open() in write mode"
    if isinstance(func, ast.Attribute):
        streams = any(kw.arg == "fileobj" for kw in call.keywords)  # tarfile.open(fileobj=pipe): no file
        if func.attr == "open" and not streams and _mode_writes(_mode_arg(call, 0)):
            return ".open() in write mode"
        if func.attr in PATH_ONLY and not (isinstance(func.value, ast.Name) and func.value.id in NOT_PATHS):
            positional = PATH_ONLY[func.attr]
            if positional is None or len(call.args) == positional:
                return f"Path.{func.attr}()"
    return None


def scan_package() -> list[Finding]:
    findings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == SEAM:
            continue
        findings += scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return sorted(findings, key=lambda f: (f.path, f.line))


def test_no_direct_mutations_outside_the_seam() -> None:
    findings = scan_package()
    assert not findings, "mutating calls outside sifoverlay.fsio (route them through io=):\n" + "\n".join(map(str, findings))


def test_scanner_catches_each_form() -> None:
    sample = '''
import os, shutil
from os import replace as swap
from pathlib import Path
os.pwrite(fd, b"x", 0)
os.ftruncate(fd, 0)
swap("a", "b")
shutil.move("a", "b")
fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
with open(p, "wb") as f: pass
with open(p, mode="r+") as f: pass
Path(p).write_text("x")
Path(p).open("a")
Path(p).mkdir(parents=True)
os.fsync(fd)
os.mkdir(d)  # io-seam: exempt (runtime mount point, removed by teardown)
os.unlink(p)  # io-seam: exempt ()
'''
    found = [(f.line, f.what) for f in scan_source(sample, "sample.py")]
    assert found == [
        (5, "os.pwrite()"),
        (6, "os.ftruncate()"),
        (7, "os.replace()"),
        (8, "shutil.move()"),
        (9, "os.open() with write flags"),
        (10, "open() in write mode"),
        (11, "open() in write mode"),
        (12, "Path.write_text()"),
        (13, ".open() in write mode"),
        (14, "Path.mkdir()"),
        (15, "os.fsync()"),
        (17, "os.unlink()"),  # an exemption needs a reason
    ]


def test_scanner_leaves_reads_and_the_seam_alone() -> None:
    sample = '''
import os
fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
data = os.pread(fd, 10, 0)
with open(p, "rb") as f: pass
with open(p) as f: pass
io.pwrite(fd, b"x", 0)
io.rename(a, b)
io.unlink(p)
io.mkdir(d, 0o755)
text = s.replace("a", "b")
new = dataclasses.replace(record, size=1)
tar = tarfile.open(fileobj=pipe, mode="w")
'''
    assert scan_source(sample, "sample.py") == []
