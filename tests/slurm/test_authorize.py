"""The Prolog's authorization, checked with the job user's own credentials (real users,
real permission bits, real symlinks and renames)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sifoverlay.errors import NotAuthorized, UsageError
from sifoverlay.slurm.authorize import authorize, canonical_path, under_roots, verify_unchanged
from tests.conftest import require_root
from tests.slurm.conftest import User

pytestmark = pytest.mark.root


@pytest.fixture
def root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the test users can traverse (pytest's tmp root is 0700)."""
    require_root()
    base = Path("/var/tmp") / f"sifo-auth-{os.getpid()}-{os.urandom(3).hex()}"
    base.mkdir(mode=0o755)
    yield base  # type: ignore[misc]
    for path in sorted(base.rglob("*"), reverse=True):
        path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    base.rmdir()


def _file(path: Path, owner: User, mode: int) -> Path:
    path.write_bytes(b"x" * 100)
    os.chown(path, owner.uid, owner.gid)
    os.chmod(path, mode)
    return path


def _check(path: Path, user: User, *, writable: bool, roots: tuple[str, ...]):  # type: ignore[no-untyped-def]
    identity = authorize(str(path), uid=user.uid, gid=user.gid, user=user.name, writable=writable, image_roots=roots)
    identity.close()
    return identity


def test_owner_may_write(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice = slurm_users[0]
    img = _file(root_dir / "a.sif", alice, 0o644)
    identity = _check(img, alice, writable=True, roots=(str(root_dir),))
    st = img.stat()
    assert (identity.path, identity.dev, identity.ino) == (str(img), st.st_dev, st.st_ino)


def test_other_user_may_read_but_not_write(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice, bob = slurm_users
    img = _file(root_dir / "a.sif", alice, 0o644)
    assert _check(img, bob, writable=False, roots=(str(root_dir),)).path == str(img)
    with pytest.raises(NotAuthorized) as info:
        _check(img, bob, writable=True, roots=(str(root_dir),))
    assert str(info.value) == f"{img}: user {bob.name} (uid {bob.uid}) may not write this image"


def test_root_view_does_not_count(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    """A root-owned 0644 image: root could write it, the job user cannot."""
    alice = slurm_users[0]
    img = root_dir / "root.sif"
    img.write_bytes(b"x")
    os.chmod(img, 0o644)
    with pytest.raises(NotAuthorized, match="may not write this image"):
        _check(img, alice, writable=True, roots=())


def test_private_image_not_even_readable(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice, bob = slurm_users
    img = _file(root_dir / "p.sif", alice, 0o600)
    with pytest.raises(NotAuthorized, match=f"user {bob.name} .* may not read this image"):
        _check(img, bob, writable=False, roots=())


def test_group_membership_is_used(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    """The check runs with the user's groups (primary and getgrouplist), as the job would."""
    alice, bob = slurm_users
    img = _file(root_dir / "g.sif", alice, 0o664)
    os.chown(img, alice.uid, bob.gid)  # bob's primary group may write
    assert _check(img, bob, writable=True, roots=()).path == str(img)


def test_symlink_is_refused(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice = slurm_users[0]
    img = _file(root_dir / "real.sif", alice, 0o644)
    link = root_dir / "link.sif"
    link.symlink_to(img)
    with pytest.raises(NotAuthorized) as info:
        _check(link, alice, writable=True, roots=(str(root_dir),))
    assert str(info.value) == f"{link}: is a symbolic link: give the image's real path"


def test_outside_roots_refused_even_through_symlinked_dir(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice = slurm_users[0]
    (root_dir / "allowed").mkdir(mode=0o755)
    (root_dir / "elsewhere").mkdir(mode=0o755)
    img = _file(root_dir / "elsewhere" / "x.sif", alice, 0o644)
    (root_dir / "allowed" / "sneaky").symlink_to(root_dir / "elsewhere")
    roots = (str(root_dir / "allowed"),)
    with pytest.raises(NotAuthorized) as info:
        _check(root_dir / "allowed" / "sneaky" / "x.sif", alice, writable=True, roots=roots)
    assert str(info.value) == f"{img}: outside the allowed image roots ({roots[0]})"


def test_not_a_regular_file_and_relative(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice = slurm_users[0]
    with pytest.raises(UsageError, match="not a regular file"):
        _check(root_dir, alice, writable=False, roots=())
    with pytest.raises(UsageError, match="image path is not absolute"):
        authorize("rel.sif", uid=alice.uid, gid=alice.gid, user=alice.name, writable=False, image_roots=())


def test_rename_swap_after_check_is_detected(root_dir: Path, slurm_users: tuple[User, User]) -> None:
    alice, bob = slurm_users
    mine = _file(root_dir / "mine.sif", alice, 0o644)
    other = _file(root_dir / "other.sif", bob, 0o644)
    identity = _check(mine, alice, writable=True, roots=())
    verify_unchanged(identity.path, identity.dev, identity.ino)  # unchanged: fine
    os.rename(other, mine)  # the user swaps in someone else's image
    with pytest.raises(NotAuthorized) as info:
        verify_unchanged(identity.path, identity.dev, identity.ino)
    assert str(info.value) == f"{mine}: was replaced after it was checked (symlink or rename swap)"
    os.unlink(mine)
    with pytest.raises(NotAuthorized, match="disappeared after it was checked"):
        verify_unchanged(identity.path, identity.dev, identity.ino)


def test_helpers() -> None:
    assert canonical_path("/usr/../usr/bin/env") == os.path.join(os.path.realpath("/usr/bin"), "env")
    assert under_roots("/a/b/c.sif", ("/x", "/a/b"))
    assert not under_roots("/a/bc.sif", ("/a/b",))
    assert not under_roots("/a/b", ("/a/b",))
