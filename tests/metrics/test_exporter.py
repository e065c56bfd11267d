"""The exporter in-process: HTTP serving (plain and gzip), one render per snapshot,
verify on demand, clean stop; `--listen` parsing and CLI argument errors."""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from sifoverlay.errors import UsageError
from sifoverlay.metrics.exporter import Exporter, ExporterConfig, parse_listen
from tests.metrics.conftest import wait_until, write_with_debugfs


def _get(url: str, *, gzipped: bool) -> tuple[bytes, str | None, str]:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzipped else {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read(), resp.headers.get("Content-Encoding"), resp.headers.get("Content-Type")


def test_serves_plain_and_gzip_and_stops(image: Path, tmp_path: Path, journal_dir: Path) -> None:
    exporter = Exporter(ExporterConfig((str(image),), host="127.0.0.1", port=0, interval=0.2,
                                       verify_interval=3600, hash_rate=None, journal_dir=str(journal_dir)))
    exporter.start()
    loop = threading.Thread(target=exporter.run)
    loop.start()
    try:
        host, port = exporter.address
        url = f"http://{host}:{port}/metrics"
        plain, encoding, ctype = _get(url, gzipped=False)
        assert encoding is None and ctype == "text/plain; version=0.0.4; charset=utf-8"
        assert f'sifoverlay_overlay_state{{image="{image}",state="clean"}} 1.0'.encode() in plain
        zipped, encoding, _ = _get(url, gzipped=True)
        assert encoding == "gzip"
        assert gzip.decompress(zipped).split(b"\n")[:8] == plain.split(b"\n")[:8]

        write_with_debugfs(image, tmp_path)
        wait_until("modified", lambda: b'state="modified"} 1.0' in _get(url, gzipped=False)[0], timeout=20)
        exporter.verify_now()
        wait_until("drift", lambda: b'state="drift"} 1.0' in _get(url, gzipped=False)[0], timeout=20)
        assert b'sifoverlay_hashed_bytes_total{source="verify"} 6.7108864e+07' in _get(url, gzipped=False)[0]
    finally:
        exporter.close()
        loop.join(10)
    assert not loop.is_alive()
    with socket.socket() as s:  # the port is released
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def test_renders_once_per_snapshot(image: Path) -> None:
    exporter = Exporter(ExporterConfig((str(image),), host="127.0.0.1", port=0))
    first = exporter.app.render()
    assert exporter.app.render() is first  # no new scan: the same bytes
    assert exporter.app.render(gzipped=True) is exporter.app.render(gzipped=True)
    exporter.scanner.scan()
    second = exporter.app.render()
    assert second is not first
    assert b"sifoverlay_exporter_last_scan_timestamp_seconds" in second


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9851", ("127.0.0.1", 9851)), (":9000", ("0.0.0.0", 9000)), ("[::1]:80", ("::1", 80)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9851", "host:", "host:http", "1.2.3.4:70000"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="expected ADDR:PORT"):
        parse_listen(text)


@pytest.mark.parametrize(("args", "message"), [
    (["--interval", "0"], "argument --interval: '0' must be > 0"),
    (["--hash-rate-limit", "-1"], "argument --hash-rate-limit: '-1' must be >= 0"),
    (["--listen", "nope"], "--listen 'nope': expected ADDR:PORT, e.g. 127.0.0.1:9851"),
])
def test_cli_argument_errors_are_one_line(image: Path, args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sifoverlay", "exporter", "--scan", str(image), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
