"""A commit rewrites the SIF header and descriptor table and then punches the replaced
metadata blobs. A `:ro` job admitted while the previous writer's job end commits (issue 17,
lease phase "reconciling") parses that metadata meanwhile: the commit waits for a reader
holding the metadata read lock (engine/leaselock.metadata_lock), so the reader sees the
whole old state or the whole new one, never a torn table or a punched manifest."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sifoverlay import engine
from sifoverlay.engine import leaselock
from sifoverlay.ocisif import open_image
from tests.engine.conftest import modify_overlay


def _header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4096)


def test_the_commit_waits_for_a_reader_parsing_then_goes_on(overlay_image: Path, tmp_path: Path) -> None:
    engine.sync(overlay_image)
    modify_overlay(overlay_image, tmp_path)
    before = _header(overlay_image)
    with open_image(overlay_image) as img:
        old_digest = img.overlay.recorded_digest  # type: ignore[union-attr]
    reader = os.open(overlay_image, os.O_RDONLY)
    done: list[object] = []
    try:
        with leaselock.metadata_lock(reader, exclusive=False) as held:
            assert held is True
            sync = threading.Thread(target=lambda: done.append(engine.sync(overlay_image)))
            sync.start()
            time.sleep(1.5)  # hashing 64 MiB and planning take far less: the commit point is reached
            assert sync.is_alive() and not done
            assert _header(overlay_image) == before  # not committed while the reader parses
            with open_image(overlay_image) as img:  # what the reader parses: the whole old state
                assert img.overlay.recorded_digest == old_digest  # type: ignore[union-attr]
        sync.join(60)
        assert not sync.is_alive()
    finally:
        os.close(reader)
    [result] = done
    assert result.action == "reconciled"  # type: ignore[attr-defined]
    with open_image(overlay_image) as img:
        assert img.overlay.recorded_digest == result.new_digest != old_digest  # type: ignore[union-attr, attr-defined]
