"""Issue 18: the revision history travels with the image through push + pull (oras://
carries the whole SIF); the sync that push runs first is itself recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Registry, run_cli, sh

pytestmark = pytest.mark.registry


def test_history_survives_push_and_pull(tmp_path: Path, registry: Registry, small_image: Path) -> None:
    from sifoverlay.ocisif import open_image

    with open_image(small_image) as img:
        offset = img.overlay.offset  # type: ignore[union-attr]
    payload = tmp_path / "note.txt"
    payload.write_text("written before the push\n")
    sh("debugfs", "-w", "-R", f"write {payload} upper/note.txt", f"{small_image}?offset={offset}")
    ref = f"oras://{registry.host}/oras/history:v1"
    pushed = run_cli("push", str(small_image), ref, "--plain-http", "--json")
    assert pushed.returncode == 0, pushed.stderr
    source = json.loads(run_cli("log", "--json", str(small_image)).stdout)
    assert [r["op"] for r in source["revisions"]][:2] == ["sync", "create"]  # push synced first: recorded
    out = tmp_path / "pulled.sif"
    pulled = run_cli("pull", ref, str(out), "--plain-http")
    assert pulled.returncode == 0, pulled.stderr
    back = json.loads(run_cli("log", "--json", str(out)).stdout)
    assert back["revisions"] == source["revisions"] and back["dropped"] == source["dropped"]
    text = run_cli("log", str(out)).stdout
    assert text.startswith(f"revision {source['revisions'][0]['seq']}  sync  ")
