"""Session-wide test helpers shared by every area. Area fixtures live in tests/<area>/conftest.py.

Test data:
- the sylabs/sif reference images and siftool goldens come from Debian's
  golang-github-sylabs-sif-dev (scripts/setup.sh installs it), read where it installs them;
- the rest of the upstream conformance set (OCI-SIF goldens, OCI layouts, the busybox SIF,
  newer sylabs/sif images) is read from $SIFOVERLAY_VECTORS (default ../shared/vectors,
  relative to the repository); it may not be copied into the repository. When it is absent,
  each test that needs it is skipped with CONFORMANCE_SKIP and the rest runs;
- runnable test images are built from Debian's busybox-static (scripts/busybox-layout.py).

No silent skips: at the end of the session every skip is printed with its reason, and the
run fails when a skip's reason is not in ALLOWED_SKIPS. CI=true or not changes nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _vectors_dir() -> Path:
    given = os.environ.get("SIFOVERLAY_VECTORS")
    if given:
        return Path(given) if os.path.isabs(given) else REPO / given
    return REPO.parent / "shared" / "vectors"


VECTORS = _vectors_dir()
HAVE_VECTORS = VECTORS.is_dir()
CONFORMANCE_SKIP = "upstream conformance vectors absent"
CONFORMANCE_SKIP_REASON = (f"{CONFORMANCE_SKIP}: {VECTORS} not found (set SIFOVERLAY_VECTORS to the directory "
                           "holding sif/, oci-sif/, oci-layouts/, singularity/; default ../shared/vectors)")
SIF_SOURCE = Path(os.environ.get("SIFOVERLAY_SIF_SOURCE", "/usr/share/gocode/src/github.com/sylabs/sif"))
SIF_IMAGES = SIF_SOURCE / "test" / "images"
SIF_GOLDENS = SIF_SOURCE / "internal" / "app" / "siftool" / "testdata"
BUSYBOX = Path(os.environ.get("SIFOVERLAY_BUSYBOX", "/bin/busybox"))

# Skip reasons a full run may report (prefix match), each with why it is acceptable.
ALLOWED_SKIPS: list[tuple[str, str]] = [
    ("pyslurm backend not testable here",
     "pyslurm X.Y only builds against Slurm X.Y and is not on PyPI for Debian's Slurm; the CLI backend is tested"),
    ("pyslurm is installed here",
     "the CLI-fallback test and the pyslurm test exclude each other: one of the two always skips"),
    (CONFORMANCE_SKIP, "the conformance set may not be copied into the repository: set SIFOVERLAY_VECTORS"),
    ("no NVIDIA GPU", "the GPU test needs an NVIDIA GPU and driver on the machine"),
]


def _debian_path(rel: str) -> Path | None:
    """Where Debian's golang-github-sylabs-sif-dev ships `rel` (a vectors-relative path), if anywhere."""
    parts = PurePosixPath(rel).parts
    if parts[:2] == ("sif", "siftool-golden"):
        return SIF_GOLDENS.joinpath(*parts[2:])
    if len(parts) == 2 and parts[0] == "sif" and parts[1].endswith(".sif"):
        return SIF_IMAGES / parts[1]
    return None


def locate_vector(rel: str) -> Path | None:
    """The file or directory `rel` (e.g. "sif/two-groups.sif", "oci-sif/TestWrite"): from
    Debian's sylabs/sif source when it ships it, else from $SIFOVERLAY_VECTORS; None if neither."""
    deb = _debian_path(rel)
    if deb is not None and deb.exists():
        return deb
    if HAVE_VECTORS and (VECTORS / rel).exists():
        return VECTORS / rel
    return None


def vector(rel: str | os.PathLike[str]) -> Path:
    """locate_vector or, when the file is missing: fail if Debian's package should have it
    and is not installed, else skip with CONFORMANCE_SKIP (the conformance set is absent)."""
    rel = os.fspath(rel)
    found = locate_vector(rel)
    if found is not None:
        return found
    if _debian_path(rel) is not None and not SIF_SOURCE.is_dir():
        pytest.fail(f"{SIF_SOURCE} missing: apt-get install golang-github-sylabs-sif-dev (scripts/setup.sh)")
    if HAVE_VECTORS:
        pytest.fail(f"{rel} is neither in {SIF_SOURCE} nor in {VECTORS}")
    pytest.skip(CONFORMANCE_SKIP_REASON)


def need_vectors(*paths: object) -> None:
    """For tests that hand paths to a subprocess: skip with CONFORMANCE_SKIP when one of
    `paths` lies in the (absent) conformance set. Other arguments are ignored."""
    if HAVE_VECTORS:
        return
    for path in paths:
        try:
            Path(os.fspath(path)).relative_to(VECTORS)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        pytest.skip(CONFORMANCE_SKIP_REASON)


def sif_reference_images() -> list[Path]:
    """The sylabs/sif reference SIFs: Debian's, plus the newer ones of the conformance set."""
    found = {p.name: p for p in sorted(SIF_IMAGES.glob("*.sif"))}
    if HAVE_VECTORS:
        for p in sorted((VECTORS / "sif").glob("*.sif")):
            found.setdefault(p.name, p)
    return [found[name] for name in sorted(found)]


def conformance_glob(pattern: str) -> list[Path]:
    """Files of the conformance set matching `pattern` (relative), [] when it is absent."""
    return sorted(VECTORS.glob(pattern)) if HAVE_VECTORS else []


def conformance_params(paths: list[Path]) -> list[object]:
    """Parametrize values: the paths, or ONE skipped parameter saying why there are none.
    A glob that finds nothing while the set is present stays empty and fails at collection
    (empty_parameter_set_mark = fail_at_collect)."""
    if HAVE_VECTORS:
        return list(paths)
    return [pytest.param(None, id="conformance-set", marks=pytest.mark.skip(reason=CONFORMANCE_SKIP_REASON))]


class VectorTree:
    """The `vectors` fixture: `vectors / "sif/two-groups.sif"` is `vector(...)`. The
    directories that merge Debian's files with the conformance set's ("sif",
    "sif/siftool-golden/TestApp_List", ...) stay VectorTrees, so that `vectors / "sif" / NAME`
    and `.glob()` see both sources."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __truediv__(self, rel: str | os.PathLike[str]) -> Any:
        full = str(PurePosixPath(self.prefix, os.fspath(rel))) if self.prefix else os.fspath(rel)
        parts = PurePosixPath(full).parts
        if parts and parts[0] == "sif" and not full.endswith((".sif", ".golden", ".md")):
            return VectorTree(full)
        return vector(full)

    def glob(self, pattern: str) -> list[Path]:
        found: dict[str, Path] = {}
        deb = _debian_path(self.prefix + "/x.sif") if self.prefix == "sif" else _debian_path(self.prefix)
        for base in ([deb.parent if self.prefix == "sif" else deb] if deb is not None else []) + (
                [VECTORS / self.prefix] if HAVE_VECTORS else []):
            for p in sorted(base.glob(pattern)):
                found.setdefault(p.name, p)
        return [found[name] for name in sorted(found)]

    def __repr__(self) -> str:
        return f"VectorTree({self.prefix!r}, debian={SIF_SOURCE}, conformance={VECTORS if HAVE_VECTORS else 'absent'})"


def require_tool(*names: str) -> None:
    """Skip when an external tool is missing (a skip the end-of-session check refuses:
    scripts/setup.sh installs every tool the suite uses)."""
    missing = [n for n in names if shutil.which(n) is None and not os.path.exists(n)]
    if missing:
        pytest.skip(f"missing tool(s): {', '.join(missing)} (scripts/setup.sh installs them)")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (the suite runs as root: scripts/test.sh)")


@pytest.fixture(scope="session")
def vectors() -> VectorTree:
    return VectorTree()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def build_busybox_oci_sif(out: Path, *, layers: int = 1) -> Path:
    """A runnable OCI-SIF made here: busybox-static laid into an OCI layout by
    scripts/busybox-layout.py, then `sifoverlay import` (the library call)."""
    from sifoverlay.ocisif.importer import import_image

    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} missing: apt-get install busybox-static (scripts/setup.sh)")
    layout = out.parent / f".{out.name}.layout"
    shutil.rmtree(layout, ignore_errors=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "busybox-layout.py"), str(layout),
                    "--busybox", str(BUSYBOX), "--layers", str(layers)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    import_image(layout, out)
    shutil.rmtree(layout)
    return out


ENGINE_BASE_GOLDEN = "oci-sif/TestUpdate/AddLayer.golden"  # Go-written: 2 layers, 7 of 12 slots free
_BUILT: dict[str, Path] = {}


def engine_base_source() -> Path:
    """The OCI-SIF (no overlay) the engine, crash and k8s tests start from: the Go-written
    golden TestUpdate/AddLayer when the conformance set is present, else busybox-static as
    a two-layer OCI-SIF built here (2 layers, 8 of 13 slots free). Copy it before use."""
    if HAVE_VECTORS:
        return VECTORS / ENGINE_BASE_GOLDEN
    if "base" not in _BUILT:
        import atexit
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="sifoverlay-test-base-"))
        atexit.register(shutil.rmtree, work, True)
        _BUILT["base"] = build_busybox_oci_sif(work / "base.oci.sif", layers=2)
    return _BUILT["base"]


def pytest_report_collectionfinish(config: pytest.Config) -> str:
    return ("engine/crash/k8s base image: "
            + (f"{ENGINE_BASE_GOLDEN} (Go-written)" if HAVE_VECTORS else "busybox-static, two layers, built here"))


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-static as a one-layer OCI-SIF (no overlay). Copy it before changing it."""
    return build_busybox_oci_sif(tmp_path_factory.mktemp("busybox") / "busybox.oci.sif")


@pytest.fixture(scope="session")
def two_layer_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-static plus a small second layer, as an OCI-SIF (no overlay). Copy it first."""
    return build_busybox_oci_sif(tmp_path_factory.mktemp("busybox2") / "busybox2.oci.sif", layers=2)


@pytest.fixture(scope="session")
def siftool() -> str:
    """Path to the Go reference siftool (sylabs/sif from Debian), built once into
    .tools/siftool by scripts/build-siftool.sh."""
    path = REPO / ".tools" / "siftool"
    if not path.exists():
        require_tool("go")
        proc = subprocess.run(
            [str(REPO / "scripts" / "build-siftool.sh"), str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            pytest.fail(f"cannot build siftool: {tail}")
    require_tool(str(path))
    return str(path)


# -- a test that reads a missing file of the conformance set skips (one reason) -----------------
def _reads_missing_vector(exc: BaseException | None) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, FileNotFoundError) and exc.filename:
            try:
                Path(os.fsdecode(exc.filename)).relative_to(VECTORS)
                return True
            except ValueError:
                pass
        exc = exc.__cause__ or exc.__context__
    return False


def _conformance_skip(exc: BaseException) -> None:
    if not HAVE_VECTORS and not isinstance(exc, pytest.skip.Exception) and _reads_missing_vector(exc):
        pytest.skip(CONFORMANCE_SKIP_REASON)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> object:
    try:
        return (yield)
    except BaseException as exc:
        _conformance_skip(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    try:
        return (yield)
    except BaseException as exc:
        _conformance_skip(exc)
        raise


# -- no silent skips ---------------------------------------------------------------------------
_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def _record(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped:
        if getattr(report, "wasxfail", None) is not None:
            _SKIPS.append((report.nodeid, f"xfail: {report.wasxfail}"))  # type: ignore[attr-defined]
        else:
            _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record(report)


def allowed_skip(reason: str) -> str | None:
    for prefix, why in ALLOWED_SKIPS:
        if reason.startswith(prefix):
            return why
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"sylabs/sif reference images and siftool goldens: {SIF_SOURCE} ({'found' if SIF_SOURCE.is_dir() else 'MISSING'})",
        f"conformance vectors (SIFOVERLAY_VECTORS): {VECTORS} ({'found' if HAVE_VECTORS else 'absent: those tests skip'})",
        "allowed skip reasons: " + "; ".join(f"'{prefix}'" for prefix, _ in ALLOWED_SKIPS),
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    refused = [(node, reason) for node, reason in _SKIPS if allowed_skip(reason) is None]
    if refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SKIPS:
        return
    tr = terminalreporter
    by_reason: dict[str, list[str]] = {}
    for node, reason in _SKIPS:
        by_reason.setdefault(reason, []).append(node)
    tr.section("skips (tests/conftest.py ALLOWED_SKIPS)")
    refused = 0
    for reason, nodes in sorted(by_reason.items()):
        why = allowed_skip(reason)
        if why is None:
            refused += len(nodes)
            tr.write_line(f"NOT ALLOWED ({len(nodes)}): {reason}", red=True, bold=True)
            for node in nodes:
                tr.write_line(f"    {node}")
        else:
            tr.write_line(f"allowed ({len(nodes)}): {reason}")
            tr.write_line(f"    why: {why}")
    if refused:
        tr.write_line(f"{refused} skip(s) with a reason not in ALLOWED_SKIPS: the run fails", red=True, bold=True)
