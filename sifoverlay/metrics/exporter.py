"""The long-running HTTP exporter (`sifoverlay exporter`).

Three activities, one process:
  * the scan loop (main thread): `Scanner.scan()` every `interval` seconds, cheap
    (stat + superblock per image);
  * the verify loop (a thread): every `verify_interval` seconds, and at once on SIGUSR1,
    hashes the images the scan found modified/unknown, one at a time, at no more than
    `hash_rate` bytes per second, then wakes the scan loop so the verdict shows;
  * the HTTP server (a thread per request): `/metrics` renders the latest snapshot.
SIGTERM/SIGINT: stop both loops (an in-flight hash is abandoned at its next chunk), close
the listening socket, exit 0. The exporter only reads images; it never takes a lease.
"""

from __future__ import annotations

import gzip
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from types import FrameType
from typing import Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from sifoverlay.errors import UsageError

from .collector import OverlayCollector
from .scan import Scanner, run_verify_pass

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "0.0.0.0:9851"
# The classic text format every Prometheus and node_exporter parses (prometheus_client
# 0.26 labels its output 1.0.0, identical for names like ours that need no escaping).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    scan_paths: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 9851
    interval: float = 15.0
    verify_interval: float = 3600.0
    hash_rate: float | None = 50e6  # bytes per second; None = unlimited
    journal_dir: str | None = None


def parse_listen(text: str) -> tuple[str, int]:
    """'ADDR:PORT', '[v6]:PORT' or ':PORT' (all interfaces) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(None, f"--listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9851")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class CachedExposition:
    """The WSGI app: renders the registry once per scan snapshot (10 000 images make a
    10 MB exposition that takes seconds to format) and serves those bytes, gzipped when
    asked, to every scrape until the next scan. Always text format 0.0.4."""

    def __init__(self, registry: CollectorRegistry, collector: OverlayCollector) -> None:
        self.registry = registry
        self.collector = collector
        self._lock = threading.Lock()
        self._key: tuple[int, float, int] | None = None
        self._plain = b""
        self._gzipped: bytes | None = None

    def render(self, *, gzipped: bool = False) -> bytes:
        with self._lock:
            snap = self.collector.snapshot()
            key = (id(snap), snap.finished, self.collector.scanner.verified_bytes)
            if key != self._key:
                self._plain, self._gzipped, self._key = generate_latest(self.registry), None, key
            if not gzipped:
                return self._plain
            if self._gzipped is None:
                self._gzipped = gzip.compress(self._plain, compresslevel=5)
            return self._gzipped

    def __call__(self, environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        zipped = gzip_accepted(str(environ.get("HTTP_ACCEPT_ENCODING", "")))
        body = self.render(gzipped=zipped)
        headers = [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))]
        if zipped:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def _server_class(host: str) -> type[_Server]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type("SifoverlayMetricsServer", (_Server,), {"address_family": family})


class Exporter:
    def __init__(self, config: ExporterConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.scanner = Scanner(config.scan_paths, journal_dir=config.journal_dir)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # max_age: a scrape rescans itself only if the scan loop fell far behind.
        self.collector = OverlayCollector(self.scanner, max_age=max(3 * config.interval, 60.0))
        self.registry.register(self.collector)
        self.app = CachedExposition(self.registry, self.collector)
        self.stop = threading.Event()
        self._wake_scan = threading.Event()
        self._wake_verify = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.server_address[0], self._server.server_address[1]

    def start(self) -> None:
        """Bind the port (UsageError if taken) and start the HTTP and verify threads."""
        try:
            self._server = make_server(self.config.host, self.config.port, self.app,  # type: ignore[arg-type]
                                       server_class=_server_class(self.config.host), handler_class=_QuietHandler)
        except OSError as exc:
            raise UsageError(None, f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from exc
        http = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        verify = threading.Thread(target=self._verify_loop, name="metrics-verify", daemon=True)
        self._threads = [http, verify]
        for thread in self._threads:
            thread.start()
        host, port = self.address
        log.info("serving metrics on %s:%d for %s", host, port, ", ".join(self.config.scan_paths))

    def verify_now(self) -> None:
        self._wake_verify.set()

    def request_stop(self) -> None:
        self.stop.set()
        self._wake_scan.set()
        self._wake_verify.set()

    def run(self) -> None:
        """The scan loop, until `request_stop`."""
        first = True
        while not self.stop.is_set():
            try:
                self.scanner.scan()
            except Exception:  # a broken scan path must not kill the exporter
                log.exception("scan failed")
            if first:
                first = False
                self._wake_verify.set()  # hash what the first scan could not judge
            self._wake_scan.wait(self.config.interval)
            self._wake_scan.clear()

    def _verify_loop(self) -> None:
        while not self.stop.is_set():
            self._wake_verify.wait(self.config.verify_interval)
            self._wake_verify.clear()
            if self.stop.is_set():
                break
            if self.scanner.latest is None:
                continue  # nothing scanned yet
            try:
                if run_verify_pass(self.scanner, rate_bytes=self.config.hash_rate, stop=self.stop):
                    self._wake_scan.set()  # show the verdicts now
            except Exception:
                log.exception("verify pass failed")

    def close(self) -> None:
        self.request_stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=30)
        log.info("exporter stopped")


def serve(config: ExporterConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (0 on a clean shutdown)."""
    exporter = Exporter(config)
    exporter.start()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        exporter.request_stop()

    def on_verify(signum: int, frame: FrameType | None) -> None:
        exporter.verify_now()

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_verify)
    try:
        exporter.run()
    finally:
        exporter.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
