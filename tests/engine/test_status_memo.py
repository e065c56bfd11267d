"""engine/statusmemo.py: `overlay status` answered from the CLI's memo prints exactly what
the full path prints (text and --json, exit code, stderr) in every state, and the memo
steps aside whenever the full path could say something else (issue 17, fast CLI)."""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import marshal
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from sifoverlay import engine
from sifoverlay.cli import main
from sifoverlay.engine import quiesce, statedir, statusmemo
from tests.engine.conftest import modify_overlay, region

status_module = importlib.import_module("sifoverlay.engine.status")  # engine.status is the function


class Cli:
    """`sifoverlay overlay status` in-process, telling which path answered."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys = capsys
        self.full_runs = 0
        real = status_module.status

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.full_runs += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(status_module, "status", counted)

    def run(self, image: Path | str, *flags: str) -> tuple[int, str, str, str]:
        """(exit code, stdout, stderr, "memo" | "full") of one status."""
        before = self.full_runs
        self.capsys.readouterr()
        code = main(["overlay", "status", *flags, str(image)])
        out, err = self.capsys.readouterr()
        return code, out, err, "full" if self.full_runs > before else "memo"

    def full_only(self, image: Path | str, *flags: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
        """The full path's answer with the memo out of the way (neither read nor written)."""
        with monkeypatch.context() as m:
            m.setattr(statusmemo, "cached_status", lambda *a, **k: None)
            m.setattr(statusmemo, "remember", lambda *a, **k: False)
            code, out, err, path = self.run(image, *flags)
        assert path == "full"
        return code, out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setattr(statusmemo, "QUIET_NS", 0)  # the images here were written a moment ago
    return Cli(capsys, monkeypatch)


def memo_file(image: Path) -> Path:
    st = os.stat(image)
    return Path(os.environ["SIFOVERLAY_STATE_DIR"]) / statusmemo.MEMO_DIR / f"{st.st_dev:x}-{st.st_ino}"


def read_memo(image: Path) -> tuple[str, Any]:
    head, _, body = memo_file(image).read_bytes().partition(b"\n")
    return head.decode(), marshal.loads(body)


def write_memo(image: Path, head: str, body: Any) -> None:
    memo_file(image).write_bytes(head.encode() + b"\n" + marshal.dumps(body, statusmemo.MARSHAL_VERSION))


def set_superblock(image: Path, offset_in_sb: int, value: bytes) -> None:
    offset, _ = region(image)
    with open(image, "r+b") as f:
        f.seek(offset + 1024 + offset_in_sb)
        f.write(value)


STATES = ["clean", "modified", "dirty", "relative-path"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("flags", [(), ("--json",), ("--no-verify",), ("--no-verify", "--json")])
def test_memo_prints_what_the_full_path_prints(overlay_image: Path, tmp_path: Path, cli: Cli,
                                               monkeypatch: pytest.MonkeyPatch, state: str,
                                               flags: tuple[str, ...]) -> None:
    engine.sync(overlay_image)
    image: Path | str = overlay_image
    if state == "modified":
        modify_overlay(overlay_image, tmp_path, b"written after the sync\n")
    elif state == "dirty":
        set_superblock(overlay_image, 58, struct.pack("<H", 0))  # s_state: not cleanly unmounted
    elif state == "relative-path":
        monkeypatch.chdir(overlay_image.parent)
        image = overlay_image.name
    full = cli.full_only(image, *flags, monkeypatch=monkeypatch)
    assert not memo_file(overlay_image).exists()
    first = cli.run(image, *flags)  # the full path, leaving the memo
    assert first == (*full, "full") and memo_file(overlay_image).is_file()
    second = cli.run(image, *flags)
    assert second == (*full, "memo"), (second, full)
    assert full[0] == 0 and full[2] == ""
    if "--json" in flags:
        data = json.loads(full[1])
        expected = {"clean": "clean", "modified": "modified", "dirty": "modified", "relative-path": "clean"}
        assert (data["state"], data["image"], data["dirty"]) == (expected[state], str(image), state == "dirty")
        assert list(data) == list(engine.status(overlay_image).as_dict())


def test_memo_file_is_private_and_names_no_image(overlay_image: Path, cli: Cli) -> None:
    engine.sync(overlay_image)
    assert cli.run(overlay_image)[3] == "full"
    memo = memo_file(overlay_image)
    assert memo.stat().st_mode & 0o777 == 0o600 and memo.stat().st_uid == os.geteuid()
    head, body = read_memo(overlay_image)
    assert head.split()[0] == statusmemo.VERSION and body["image"] == ""
    assert body == {**engine.status(overlay_image).as_dict(), "image": ""}
    assert os.fsencode(overlay_image) not in memo.read_bytes()


def test_verify_always_takes_the_full_path(overlay_image: Path, cli: Cli) -> None:
    engine.sync(overlay_image)
    cli.run(overlay_image)
    assert memo_file(overlay_image).is_file()
    code, out, _, path = cli.run(overlay_image, "--verify", "--json")
    assert (code, path) == (0, "full") and json.loads(out)["actual_digest"] == engine.status(overlay_image).recorded_digest


def test_verbose_takes_the_full_path(overlay_image: Path, cli: Cli) -> None:
    """-v asks for the engine's log, which only the full path writes."""
    engine.sync(overlay_image)
    cli.run(overlay_image)
    assert cli.run(overlay_image)[3] == "memo"
    before = cli.full_runs
    assert main(["-v", "overlay", "status", str(overlay_image)]) == 0
    assert cli.full_runs == before + 1


def test_no_fingerprint_memo_answers_no_verify_only(overlay_image: Path, cli: Cli) -> None:
    """Without a recorded fingerprint the default (verify=None) hashes: never from the memo."""
    engine.sync(overlay_image)
    cli.run(overlay_image)
    head, data = read_memo(overlay_image)
    data["fingerprint_recorded"], data["state"] = None, "unknown"
    write_memo(overlay_image, head, data)
    assert statusmemo.cached_status(str(overlay_image), verify=None, journal_dir=None) is None
    answer = statusmemo.cached_status(str(overlay_image), verify=False, journal_dir=None)
    assert answer is not None and answer["state"] == "unknown"


def test_no_memo_while_the_image_was_just_written(overlay_image: Path, cli: Cli,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statusmemo, "QUIET_NS", statusmemo.noopmemo.QUIET_NS)
    engine.sync(overlay_image)
    assert cli.run(overlay_image)[3] == "full"
    assert not memo_file(overlay_image).exists()
    assert cli.run(overlay_image)[3] == "full"


def test_no_memo_of_a_status_that_warned(overlay_image: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.sync(overlay_image)
    real = status_module._status

    def warning(*args: Any) -> Any:
        logging.getLogger("sifoverlay.test").warning("something odd")
        return real(*args)

    monkeypatch.setattr(status_module, "_status", warning)
    assert cli.run(overlay_image)[3] == "full"
    assert not memo_file(overlay_image).exists()


def test_a_write_during_the_status_leaves_no_memo(overlay_image: Path, cli: Cli, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp is taken before the parse: a write meanwhile moves the ctime."""
    engine.sync(overlay_image)
    real = status_module._status

    def written_meanwhile(*args: Any) -> Any:
        result = real(*args)
        os.chmod(overlay_image, 0o640)
        return result

    monkeypatch.setattr(status_module, "_status", written_meanwhile)
    assert cli.run(overlay_image)[3] == "full"
    assert not memo_file(overlay_image).exists()


def remembered(image: Path, cli: Cli) -> None:
    engine.sync(image)
    assert cli.run(image)[3] == "full"
    assert cli.run(image)[3] == "memo"


def test_a_lease_holder_takes_the_full_path(overlay_image: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    remembered(overlay_image, cli)
    with engine.lease.acquire(overlay_image, engine.lease.Holder.current("job-7", "test")):
        full = cli.full_only(overlay_image, monkeypatch=monkeypatch)
        code, out, err, path = cli.run(overlay_image)
        assert (code, out, err, path) == (*full, "full")
        assert out.startswith(f"{overlay_image}: in-use\n") and "job-7" in out
    assert cli.run(overlay_image)[3] == "memo"  # released: the record is gone


def test_any_lease_record_takes_the_full_path(overlay_image: Path, cli: Cli) -> None:
    """A record the full path would judge (stale or not) is for the full path to judge."""
    remembered(overlay_image, cli)
    fd = statedir.open_image_checked(str(overlay_image))
    try:
        key = statedir.identity_key(fd)
    finally:
        os.close(fd)
    leases = Path(statedir.leases_dir())
    leases.mkdir(parents=True, exist_ok=True)
    record = leases / f"{key}{statusmemo.LEASE_SUFFIX}"
    record.write_text("not a record")
    assert statusmemo.cached_status(str(overlay_image), verify=None, journal_dir=None) is None
    record.unlink()
    assert statusmemo.cached_status(str(overlay_image), verify=None, journal_dir=None) is not None


def test_a_write_lock_on_the_overlay_takes_the_full_path(overlay_image: Path, cli: Cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sifoverlay.engine.leaselock import F_OFD_SETLK, flock_struct

    remembered(overlay_image, cli)
    offset, _ = region(overlay_image)
    holder = os.open(overlay_image, os.O_RDWR)
    try:
        fcntl.fcntl(holder, F_OFD_SETLK, flock_struct(fcntl.F_WRLCK, offset + 4096, 4096))
        full = cli.full_only(overlay_image, monkeypatch=monkeypatch)
        assert cli.run(overlay_image) == (*full, "full")
        assert full[1].startswith(f"{overlay_image}: in-use\n") and "write lock" in full[1]
    finally:
        os.close(holder)
    assert cli.run(overlay_image)[3] == "memo"  # a read lock or none: no writer


@pytest.mark.parametrize("check", ["loop_devices", "fuse_mounts", "fuse_processes"])
def test_a_writer_seen_by_quiesce_takes_the_full_path(overlay_image: Path, cli: Cli,
                                                      monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    """The memo runs quiesce's own checks: what find_activity would count as a writer
    sends the status to the full path (which then reports it), readers do not."""
    remembered(overlay_image, cli)
    reader = quiesce.Activity("fuse-layer", "squashfuse mount at /mnt (ro)", False)
    writer = quiesce.Activity("fuse", "fuse2fs mount at /mnt (rw)", True)
    monkeypatch.setattr(quiesce, check, lambda *a, **k: [reader])
    assert cli.run(overlay_image)[3] == "memo"
    monkeypatch.setattr(quiesce, check, lambda *a, **k: [reader, writer])
    code, out, err, path = cli.run(overlay_image)
    assert (code, path) == (0, "full") and out.startswith(f"{overlay_image}: in-use\n")
    assert f"  in use: {writer.detail}\n" in out


def test_a_journal_entry_takes_the_full_path(overlay_image: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    remembered(overlay_image, cli)
    fd = statedir.open_image_checked(str(overlay_image))
    try:
        key = statedir.identity_key(fd)
    finally:
        os.close(fd)
    journal = Path(os.environ["SIFOVERLAY_JOURNAL_DIR"])
    journal.mkdir(parents=True, exist_ok=True)
    entry = journal / f"{key}.00000001-host-1-abc{statusmemo.noopmemo.JOURNAL_SUFFIX}"
    entry.write_bytes(b"")  # any entry by name, even one Journal would not read
    full = cli.full_only(overlay_image, monkeypatch=monkeypatch)
    assert cli.run(overlay_image) == (*full, "full")
    entry.unlink()
    assert cli.run(overlay_image)[3] == "memo"
    # another journal directory holds no entry of it: the memo answers there too
    assert cli.run(overlay_image, "--journal-dir", str(journal.parent / "other"))[3] == "memo"


def test_image_changes_void_the_memo(overlay_image: Path, cli: Cli, tmp_path: Path) -> None:
    remembered(overlay_image, cli)
    os.chmod(overlay_image, 0o640)  # ctime only
    assert statusmemo.cached_status(str(overlay_image), verify=None, journal_dir=None) is None
    assert cli.run(overlay_image)[3] == "full"
    assert cli.run(overlay_image)[3] == "memo"
    modify_overlay(overlay_image, tmp_path, b"new bytes\n")
    code, out, _, path = cli.run(overlay_image)
    assert (code, path) == (0, "full") and out.startswith(f"{overlay_image}: modified\n")


def test_a_different_superblock_voids_the_memo(overlay_image: Path, cli: Cli) -> None:
    """A write that kept the ctime (not possible through the kernel, simulated in the memo)."""
    remembered(overlay_image, cli)
    head, body = read_memo(overlay_image)
    fields = head.split()
    superblock = bytearray(bytes.fromhex(fields[-1]))
    superblock[52] ^= 1  # mnt_count
    fields[-1] = superblock.hex()
    write_memo(overlay_image, " ".join(fields), body)
    assert statusmemo.cached_status(str(overlay_image), verify=None, journal_dir=None) is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-version", "not-a-dict", "symlink", "foreign-owner"])
def test_a_bad_memo_gives_no_answer(overlay_image: Path, cli: Cli, tmp_path: Path, damage: str) -> None:
    remembered(overlay_image, cli)
    memo = memo_file(overlay_image)
    text = memo.read_bytes()
    if damage == "truncated":
        memo.write_bytes(text[:-10])
    elif damage == "garbage":
        memo.write_bytes(b"\xff\xfe not a memo\n")
    elif damage == "other-version":
        memo.write_bytes(text.replace(statusmemo.VERSION.encode(), b"sifoverlay-status-memo-1"))
    elif damage == "not-a-dict":
        write_memo(overlay_image, read_memo(overlay_image)[0], [1, 2])
    elif damage == "symlink":
        real = tmp_path / "elsewhere"
        real.write_bytes(text)
        memo.unlink()
        memo.symlink_to(real)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to chown")
        os.chown(memo, 65534, 65534)
    assert statusmemo.cached_status(str(overlay_image), verify=None, journal_dir=None) is None
    code, out, _, path = cli.run(overlay_image)
    assert (code, path) == (0, "full") and out.startswith(f"{overlay_image}: clean\n")


@pytest.mark.parametrize("case", ["no-overlay", "garbage", "missing", "symlink"])
@pytest.mark.parametrize("flags", [(), ("--json",)])
def test_errors_are_the_full_paths(base_image: Path, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch,
                                   case: str, flags: tuple[str, ...]) -> None:
    """No memo answers for an image the full path refuses: the same one line, exit code."""
    image = base_image
    if case == "garbage":
        image = tmp_path / "garbage.sif"
        image.write_bytes(b"not a SIF at all" * 64)
    elif case == "missing":
        image = tmp_path / "missing.sif"
    elif case == "symlink":
        image = tmp_path / "link.sif"
        image.symlink_to(base_image)
    full = cli.full_only(image, *flags, monkeypatch=monkeypatch)
    assert full[0] != 0 and full[1] == "" and len(full[2].splitlines()) == 1
    assert cli.run(image, *flags) == (*full, "full")
    assert cli.run(image, *flags) == (*full, "full")
    assert not (Path(os.environ["SIFOVERLAY_STATE_DIR"]) / statusmemo.MEMO_DIR).exists()


def test_the_memo_path_loads_no_parser(overlay_image: Path, cli: Cli) -> None:
    """In a fresh interpreter: the answer, and none of the parsers, logging or dataclasses."""
    from tests.cli.test_cli_imports import FORBIDDEN, NOT_FOR_MEMO_NOOP, loaded_by, offending

    remembered(overlay_image, cli)
    expected = cli.run(overlay_image)
    assert expected[3] == "memo"
    code, out, modules = loaded_by("overlay", "status", str(overlay_image))
    assert (code, out) == (0, expected[1])
    assert "sifoverlay.engine.statusmemo" in modules
    assert offending(modules, NOT_FOR_MEMO_NOOP) == [] and offending(modules, FORBIDDEN) == []
    assert offending(modules, ("sifoverlay.engine.lease", "socket", "secrets", "threading")) == []


def test_constants_are_the_engines() -> None:
    from sifoverlay.engine import leasefile, leaselock

    assert statusmemo.LEASE_SUFFIX == leasefile.LEASE_SUFFIX
    assert statusmemo._FLOCK == leaselock._FLOCK and statusmemo.F_OFD_GETLK == leaselock.F_OFD_GETLK


@pytest.mark.parametrize("entries", [None, [], ["other-key.1.sovj"], ["KEY.1.sovj"], ["KEY.1.sovj.tmp", "KEY.txt"]])
def test_pending_count_is_the_journals(tmp_path: Path, entries: list[str] | None) -> None:
    """status counts pending entries without loading the journal module when there is
    no entry of the image by name; the count is Journal.pending's either way."""
    from sifoverlay.engine.journal import Journal

    journal, key = tmp_path / "journal-x", "0123456789abcdef-42-0"
    if entries is not None:
        journal.mkdir()
        for name in entries:
            (journal / name.replace("KEY", key)).write_bytes(b"")
    assert status_module._pending(journal, key) == len(Journal(journal).pending(key=key))
