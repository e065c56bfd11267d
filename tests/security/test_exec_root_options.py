"""Issue 12, finding 9 (second half): `sifoverlay exec` run through sudo must not hand
the caller root's reach. As root, the options that go beyond the caller's own rights are
refused (exit 77, nothing mounted, no lease, no session) unless `--allow-root-options`.

Without the fix, `sudo sifoverlay exec --bind /etc/shadow-dir:/mnt IMG -- cat ...` read a
root-only host file as the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifoverlay.runtime import mounts
from tests.runtime.conftest import (  # noqa: F401  (fixtures)
    Env,
    env,
    fuse_for_users,
    golden_image,
    rootfs_tree,
    scratch,
    user,
)

pytestmark = pytest.mark.root

SECRET = "root-only secret\n"


def sudo_exec(e: Env, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`sudo -u root sifoverlay exec ARGS` as the test user would run it: SUDO_UID/SUDO_GID
    name the caller, the state directories come from the defaults (here pointed at the
    test's directories by the admin's own flags only when the test says so)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIFOVERLAY_")}
    environ.update({"SUDO_UID": str(e.user.uid), "SUDO_GID": str(e.user.gid), "SUDO_USER": e.user.name})
    environ.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "sifoverlay", "exec", *args], capture_output=True, text=True,
                          timeout=120, env=environ, stdin=subprocess.DEVNULL, cwd="/")


@pytest.mark.parametrize("option", [
    ["--bind", "{secret_dir}:/home"],
    ["--mount", "kernel"],
    ["--user", "0"],
    ["--job-id", "12345"],
    ["--base-dir", "{dir}/other-run"],
    ["--journal-dir", "{dir}/other-journal"],
    ["--lease-ttl", "0.1"],
])
def test_root_only_options_are_refused_under_sudo(env: Env, option: list[str]) -> None:
    secret_dir = env.dir / "secret"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "shadow").write_text(SECRET)
    args = [a.format(secret_dir=secret_dir, dir=env.dir) for a in option]
    before = sorted(os.listdir(env.dir))
    res = sudo_exec(env, *args, str(env.image), "--", "cat", "/home/shadow")
    assert res.returncode == 77, (res.stdout, res.stderr)
    assert SECRET not in res.stdout
    assert "--allow-root-options" in res.stderr and option[0] in res.stderr, res.stderr
    assert sorted(os.listdir(env.dir)) == before  # no lease, no runtime dir, no journal
    assert mounts.mounts_under(str(env.dir)) == []


def test_state_dir_overrides_in_the_environment_are_refused(env: Env) -> None:
    res = sudo_exec(env, str(env.image), "--", "true",
                    extra_env={"SIFOVERLAY_RUNTIME_DIR": str(env.base), "SIFOVERLAY_JOURNAL_DIR": str(env.journal)})
    assert res.returncode == 77
    assert "$SIFOVERLAY_JOURNAL_DIR, $SIFOVERLAY_RUNTIME_DIR" in res.stderr, res.stderr
    assert not env.base.exists() and not env.journal.exists()


def test_admin_flag_allows_them(env: Env) -> None:
    share = env.dir / "share"
    share.mkdir()
    (share / "data").write_text("shared\n")
    os.chmod(share / "data", 0o644)
    res = sudo_exec(env, "--allow-root-options", "--base-dir", str(env.base), "--journal-dir", str(env.journal),
                    "--bind", f"{share}:/home:ro", str(env.image), "--", "cat", "/home/data")
    assert (res.returncode, res.stdout) == (0, "shared\n"), res.stderr
