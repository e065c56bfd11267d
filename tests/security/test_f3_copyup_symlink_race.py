"""Issue 12, finding 3: the runtime's copy-up (runtime/copyup.py) ran lstat/mkdir/chown/
chmod/utime as root, by path, in the upper directory that the job user's own fuse2fs
serves. A daemon that answers "directory" and then "symlink to /etc" gets root to
create, chown and chmod host paths.

A malicious FUSE daemon is replaced here by what it amounts to: an upper tree the
attacker (a real unprivileged user) owns, whose directories a flipper process swaps with
symlinks into a root-owned victim directory (renameat2 RENAME_EXCHANGE in a tight loop)
while root runs the copy-up again and again. The victim tree must be unchanged: no
directory created there, no mode or owner changed. And the copy-up really runs as the job
user, without capabilities, with no_new_privs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifoverlay.runtime import copyup
from tests.conftest import require_root, require_tool

from .h4_support import RealUser, flipper_argv, real_user

pytestmark = pytest.mark.root
ROUNDS = 40
IN_PROCESS_ROUNDS = 4000


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files, "."]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(os.path.normpath(path), root)] = (st.st_mode, st.st_uid, st.st_gid)
    return found


@pytest.fixture
def attacker() -> Iterator[RealUser]:
    require_root()
    require_tool("useradd", "userdel", "setpriv")
    with real_user("sifatk") as u:
        yield u


@pytest.fixture
def trees(attacker: RealUser) -> Iterator[tuple[Path, Path, Path]]:
    """(lower, upper, victim) under a world-traversable root-owned directory."""
    base = Path(tempfile.mkdtemp(prefix="sifsec-f3-", dir="/tmp"))
    base.chmod(0o755)
    lower, upper, victim = base / "lower", base / "upper", base / "victim"
    for rel, mode in (("tmp", 0o1777), ("var", 0o755), ("var/tmp", 0o1777), ("opt", 0o755),
                      ("opt/shared", 0o777)):
        (lower / rel).mkdir(parents=True)
        (lower / rel).chmod(mode)
    victim.mkdir(mode=0o755)
    (victim / "tmp").mkdir()
    (victim / "tmp").chmod(0o1755)  # what a 022-masked copy-up of /tmp looks like: root would "repair" it
    (victim / "secret").write_text("root only\n")
    (victim / "secret").chmod(0o600)
    upper.mkdir()
    for name in ("var", "opt"):  # real directories and, beside them, symlinks into the victim tree
        (upper / name).mkdir()
        (upper / f"{name}.alt").symlink_to(victim)
    subprocess.run(["chown", "-hR", f"{attacker.uid}:{attacker.gid}", str(upper)], check=True)
    try:
        yield lower, upper, victim
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_copyup_runs_as_the_job_user_without_privilege(trees: tuple[Path, Path, Path], attacker: RealUser) -> None:
    lower, upper, _ = trees
    report = copyup.run_as_user(str(upper), [str(lower)], attacker.uid, attacker.gid)
    assert (report["uid"], report["euid"], report["cap_eff"], report["no_new_privs"]) == (
        attacker.uid, attacker.uid, 0, 1)
    # it did its job where the user may: /tmp copied up 1777 (owner stays hers: a plain
    # directory, not fuse2fs -o fakeroot, refuses her chown to root)
    assert "tmp" in report["changed"] and (upper / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (upper / "tmp").stat().st_uid == attacker.uid


def test_symlink_flipper_cannot_redirect_root_copyup(trees: tuple[Path, Path, Path], attacker: RealUser) -> None:
    lower, upper, victim = trees
    before = snapshot(victim)
    flippers = [
        subprocess.Popen(flipper_argv(str(upper / name), str(upper / f"{name}.alt")), user=attacker.uid,
                         group=attacker.gid, extra_groups=[], stdin=subprocess.DEVNULL)
        for name in ("var", "opt")
    ]
    try:
        time.sleep(0.2)
        start = time.monotonic()
        for _ in range(ROUNDS):
            copyup.prepare_upper(str(upper), [str(lower)], uid=attacker.uid, gid=attacker.gid)
        assert time.monotonic() - start < ROUNDS * 5  # never blocked
        # root's in-process variant (used for uid-0 jobs), many more rounds: the descriptor
        # walk alone must hold too (the old path walk lost this race within ~3000 rounds,
        # creating victim/shared 0777 and making victim/tmp 1777)
        for _ in range(IN_PROCESS_ROUNDS):
            copyup.prepare_here(str(upper), [str(lower)])
        assert all(f.poll() is None for f in flippers)  # the race really ran throughout
    finally:
        for f in flippers:
            f.kill()
            f.wait()
    assert snapshot(victim) == before
    assert (victim / "secret").read_text() == "root only\n"


def test_in_process_copyup_follows_no_symlink(trees: tuple[Path, Path, Path]) -> None:
    """Root's own in-process variant (job user root, mount=kernel) is fd-based too."""
    lower, upper, victim = trees
    before = snapshot(victim)
    for name in ("var", "opt"):
        os.rename(upper / name, upper / f"{name}.real")
        os.rename(upper / f"{name}.alt", upper / name)  # now a symlink into the victim tree
    changed = copyup.prepare_here(str(upper), [str(lower)])
    assert changed == ["tmp"]
    assert snapshot(victim) == before
