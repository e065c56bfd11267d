"""Fixtures for the metrics tests: one small OCI-SIF with a sparse 64 MiB overlay built
once (busybox-static imported: tests/conftest.py busybox_image), copied sparsely per test; and, for the
end-to-end tests, a real Prometheus plus a real node_exporter (textfile collector only)
on loopback, started once per session and stopped at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

RULES = REPO / "charts" / "sifoverlay" / "files" / "prometheus-rules.yml"


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check, **kw)  # type: ignore[call-overload]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nobody listens on the port: a server (SO_REUSEADDR, as every server sets, so the
    TIME_WAIT of Prometheus's last scrape does not count) can bind and listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def wait_until(what: str, check: Callable[[], object], timeout: float = 30.0, step: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return int(proc.returncode)


@pytest.fixture(autouse=True)
def journal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own journal directory (never the machine's)."""
    path = tmp_path / "journal"
    monkeypatch.setenv("SIFOVERLAY_JOURNAL_DIR", str(path))
    monkeypatch.delenv("SIFOVERLAY_TEXTFILE_DIR", raising=False)
    return path


@pytest.fixture(scope="session")
def template_image(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> Path:
    """busybox as an OCI-SIF with a sparse 64 MiB overlay, built once per session."""
    require_tool("mkfs.ext3")
    from sifoverlay import engine

    directory = tmp_path_factory.mktemp("metrics-template")
    path = directory / "template.oci.sif"
    shutil.copyfile(busybox_image, path)
    engine.create_overlay(path, size_mib=64, sparse=True, journal_dir=directory / "journal")
    return path


def clone(template: Path, dest: Path) -> Path:
    """A sparse copy (holes stay holes: 64 MiB overlays cost ~1 MiB each)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sh("cp", "--sparse=always", str(template), str(dest))
    return dest


@pytest.fixture
def image(template_image: Path, tmp_path: Path) -> Path:
    return clone(template_image, tmp_path / "images" / "a.oci.sif")


def overlay_region(path: Path) -> tuple[int, int]:
    from sifoverlay.ocisif import open_image

    with open_image(path) as img:
        assert img.overlay is not None
        return img.overlay.offset, img.overlay.size


def write_with_debugfs(path: Path, tmp: Path, name: str = "upper/hello", content: bytes = b"hello\n") -> None:
    """e2fsprogs write into the overlay: changes the superblock fingerprint."""
    require_tool("debugfs")
    offset, _ = overlay_region(path)
    src = tmp / "payload"
    src.write_bytes(content)
    sh("debugfs", "-w", "-R", f"write {src} {name}", f"{path}?offset={offset}")


@contextmanager
def fuse2fs_mounted(path: Path, mountpoint: Path, *, source: str | None = None) -> Iterator[Path]:
    """A real rw FUSE mount of the overlay at its offset (`source`: the path as given to
    fuse2fs, e.g. relative), unmounted on exit."""
    require_tool("fuse2fs", "fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    offset, _ = overlay_region(path)
    mountpoint.mkdir(exist_ok=True)
    sh("fuse2fs", source or str(path), str(mountpoint), "-o", f"offset={offset}", cwd=str(path.parent))
    try:
        yield mountpoint
    finally:
        sh("fusermount3", "-u", str(mountpoint))
        # fusermount3 returns before the fuse2fs daemon has flushed and exited.
        from sifoverlay.engine.quiesce import fuse_processes

        st = os.stat(path)
        wait_until("fuse2fs exited", lambda: not fuse_processes(st), timeout=30, step=0.05)


def write_with_fuse2fs(path: Path, mountpoint: Path, name: str = "hello", content: bytes = b"hello\n") -> None:
    """A real rw FUSE mount of the overlay at its offset, one file written, unmounted."""
    with fuse2fs_mounted(path, mountpoint) as mnt:
        (mnt / "upper" / name).write_bytes(content)


# --- the real Prometheus stack ----------------------------------------------------------
@dataclass
class PromStack:
    url: str
    exporter_port: int
    textfile_dir: Path

    def query(self, expr: str) -> list[dict[str, object]]:
        qs = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, None when it has no result."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])  # type: ignore[index]

    def wait_value(self, expr: str, expected: float, timeout: float = 60.0) -> None:
        seen: list[float | None] = []

        def check() -> bool:
            seen.append(self.value(expr))
            return seen[-1] == expected

        try:
            wait_until(f"{expr} == {expected}", check, timeout=timeout, step=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; values seen: {sorted(set(map(str, seen)))}") from None

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as resp:
            return json.load(resp)


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    """Prometheus (scrape and rule evaluation every 1 s, our alert rules loaded) scraping
    the exporter port the tests use and a node_exporter reading a textfile directory."""
    require_tool("prometheus", "prometheus-node-exporter")
    base = tmp_path_factory.mktemp("prom")
    textfile_dir = base / "textfile"
    textfile_dir.mkdir()
    exporter_port, node_port, prom_port = free_port(), free_port(), free_port()
    node = _start(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{node_port}",
                   "--collector.disable-defaults", "--collector.textfile",
                   f"--collector.textfile.directory={textfile_dir}"], base / "node.log")
    config = base / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        "- job_name: sifoverlay-exporter\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
        "- job_name: node\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{node_port}']}}]\n"
    )
    server = _start(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], base / "prometheus.log")
    stack = PromStack(f"http://127.0.0.1:{prom_port}", exporter_port, textfile_dir)
    try:
        def ready() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"prometheus exited: {(base / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{stack.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until("prometheus ready", ready, timeout=30)
        # The first scrape comes ~5 s after start (scrape manager's initial sync).
        wait_until("node_exporter scraped", lambda: stack.value('up{job="node"}') == 1.0, timeout=30, step=0.5)
        yield stack
    finally:
        for proc in (server, node):
            stop_process(proc)


@pytest.fixture
def run_exporter(prom: PromStack, tmp_path: Path, journal_dir: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `sifoverlay exporter` on the port Prometheus scrapes; stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*scan: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        wait_until("exporter port free", lambda: port_is_free(prom.exporter_port), timeout=10)
        argv = [sys.executable, "-m", "sifoverlay", "-v", "exporter", "--scan", *map(str, scan),
                "--listen", f"127.0.0.1:{prom.exporter_port}", "--interval", "0.5",
                "--verify-interval", "3600", "--hash-rate-limit", "0", "--journal-dir", str(journal_dir), *extra]
        proc = _start(argv, tmp_path / f"exporter{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    require_tool("promtool")
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)


def exporter_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("exporter*.log")))

