"""engine/noopmemo.py: the CLI's memo of a no-op sync answers only while the full path
would answer the same, and never otherwise (issue 17, fast CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sifoverlay import engine
from sifoverlay.cli import main
from sifoverlay.engine import noopmemo
from tests.conftest import require_root
from tests.engine.conftest import modify_overlay, region


@pytest.fixture
def remembered(overlay_image: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A synced image whose fast no-op left a memo (QUIET_NS 0: the image was just written)."""
    engine.sync(overlay_image)
    monkeypatch.setattr(noopmemo, "QUIET_NS", 0)
    result = engine.sync(overlay_image, remember_noop=True)
    assert result.action == "noop" and result.bytes_hashed == 0
    return overlay_image, result.new_digest


def memo_file(image: Path) -> Path:
    st = os.stat(image)
    return Path(os.environ["SIFOVERLAY_STATE_DIR"]) / noopmemo.MEMO_DIR / f"{st.st_dev:x}-{st.st_ino}"


def test_memo_answers_what_the_full_path_answers(remembered: tuple[Path, str]) -> None:
    image, digest = remembered
    assert memo_file(image).is_file() and memo_file(image).stat().st_mode & 0o777 == 0o600
    assert noopmemo.recorded_noop(str(image)) == digest
    full = engine.sync(image).as_dict()
    fast = noopmemo.noop_result(str(image), digest, full["seconds"])  # type: ignore[arg-type]
    assert list(fast) == list(full) and fast == full


def test_no_memo_for_a_recently_written_image(overlay_image: Path) -> None:
    """The default QUIET_NS: an image written a moment ago (the sync's commit) gets none."""
    engine.sync(overlay_image)
    assert engine.sync(overlay_image, remember_noop=True).action == "noop"
    assert not memo_file(overlay_image).exists()
    assert noopmemo.recorded_noop(str(overlay_image)) is None


def test_no_memo_without_remember(overlay_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Slurm and k8s callers do not ask for it: their state directory gets nothing."""
    engine.sync(overlay_image)
    monkeypatch.setattr(noopmemo, "QUIET_NS", 0)
    assert engine.sync(overlay_image).action == "noop"
    assert not memo_file(overlay_image).exists()


def test_a_write_to_the_overlay_voids_the_memo(remembered: tuple[Path, str], tmp_path: Path) -> None:
    image, digest = remembered
    modify_overlay(image, tmp_path, b"changed after the memo\n")
    assert noopmemo.recorded_noop(str(image)) is None
    code = main(["overlay", "sync", str(image)])
    assert code == 0
    assert engine.status(image).recorded_digest != digest  # the full path reconciled it


def test_a_metadata_change_alone_voids_the_memo(remembered: tuple[Path, str]) -> None:
    image, _ = remembered
    os.chmod(image, 0o640)  # ctime moves, no byte changes
    assert noopmemo.recorded_noop(str(image)) is None


def test_a_different_superblock_voids_the_memo(remembered: tuple[Path, str]) -> None:
    """A write that kept the ctime (not possible through the kernel, simulated in the memo):
    the superblock bytes still decide."""
    image, _ = remembered
    memo = memo_file(image)
    fields = memo.read_text().split()
    superblock = bytearray(bytes.fromhex(fields[-1]))
    superblock[52] ^= 1  # mnt_count
    fields[-1] = superblock.hex()
    memo.write_text(" ".join(fields) + "\n")
    assert noopmemo.recorded_noop(str(image)) is None


def test_a_pending_journal_entry_voids_the_memo(remembered: tuple[Path, str]) -> None:
    image, digest = remembered
    journal = Path(os.environ["SIFOVERLAY_JOURNAL_DIR"])
    key = memo_file(image).read_text().split()[6]
    journal.mkdir(parents=True, exist_ok=True)
    entry = journal / f"{key}.00000001{noopmemo.JOURNAL_SUFFIX}"
    entry.write_bytes(b"")  # any entry of the image counts, even one Journal would not read
    assert noopmemo.recorded_noop(str(image)) is None
    entry.unlink()
    assert noopmemo.recorded_noop(str(image)) == digest


def test_another_journal_directory_voids_the_memo(remembered: tuple[Path, str], tmp_path: Path) -> None:
    image, digest = remembered
    assert noopmemo.recorded_noop(str(image), tmp_path / "other-journal") is None
    assert noopmemo.recorded_noop(str(image), os.environ["SIFOVERLAY_JOURNAL_DIR"]) == digest


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-version", "symlink", "foreign-owner"])
def test_a_bad_memo_gives_no_answer(remembered: tuple[Path, str], tmp_path: Path, damage: str) -> None:
    image, _ = remembered
    memo = memo_file(image)
    text = memo.read_text()
    if damage == "truncated":
        memo.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        memo.write_bytes(b"\xff\xfe not a memo\n")
    elif damage == "other-version":
        memo.write_text(text.replace(noopmemo.VERSION, "sifoverlay-noop-memo-0"))
    elif damage == "symlink":
        real = tmp_path / "elsewhere"
        real.write_text(text)
        memo.unlink()
        memo.symlink_to(real)
    else:
        require_root()
        os.chown(memo, 65534, 65534)
    assert noopmemo.recorded_noop(str(image)) is None


def test_an_image_that_cannot_be_opened_gives_no_answer(remembered: tuple[Path, str], tmp_path: Path) -> None:
    image, _ = remembered
    link = tmp_path / "link.sif"
    link.symlink_to(image)
    assert noopmemo.recorded_noop(str(link)) is None  # sync refuses the symlink; so does the memo
    assert noopmemo.recorded_noop(str(tmp_path / "missing.sif")) is None


@pytest.mark.parametrize("env", [{}, {"SIFOVERLAY_JOURNAL_DIR": ""}, {"SIFOVERLAY_JOURNAL_DIR": "rel/journal"}])
def test_journal_directory_is_the_journals(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    from sifoverlay.engine.journal import Journal

    monkeypatch.delenv("SIFOVERLAY_JOURNAL_DIR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert noopmemo.journal_directory(None) == Journal(None).directory
    assert noopmemo.journal_directory("x/y") == Journal("x/y").directory


def test_constants_are_the_engines() -> None:
    from sifoverlay.engine import journal
    from sifoverlay.ext3 import superblock

    assert noopmemo.JOURNAL_SUFFIX == journal.SUFFIX
    assert noopmemo.ENV_JOURNAL_DIR == journal.ENV_JOURNAL_DIR
    assert (noopmemo.SUPERBLOCK_OFFSET, noopmemo.SUPERBLOCK_SIZE) == (superblock.SUPERBLOCK_OFFSET,
                                                                      superblock.SUPERBLOCK_SIZE)


def test_memo_region_is_the_overlays(remembered: tuple[Path, str]) -> None:
    image, digest = remembered
    fields = memo_file(image).read_text().split()
    assert (int(fields[7]), int(fields[8]), fields[9]) == (*region(image), digest)
