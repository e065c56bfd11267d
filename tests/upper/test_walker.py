"""walk_upper / upper_to_tar / upper_to_squashfs on hand-made uppers (edge cases)."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from sifoverlay.errors import ExternalToolError, OverlayStateError, UsageError
from sifoverlay.upper import is_overlay_xattr, upper_to_squashfs, upper_to_tar, walk_upper
from tests.conftest import require_root, require_tool
from tests.upper.conftest import manifest, mounted


def tar_members(upper: Path) -> dict[str, tarfile.TarInfo]:
    buf = io.BytesIO()
    upper_to_tar(upper, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        return {m.name: m for m in tf.getmembers()}


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    require_root()  # mknod and trusted.* xattrs
    root = tmp_path / "upper"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_text("data\n")
    os.mknod(root / "dir" / "kernel-gone", 0o020000, os.makedev(0, 0))
    os.link(root / "dir" / "kernel-gone", root / "shared-gone")  # kernel whiteout sharing
    (root / ".wh.aufs-gone").touch()
    (root / "userx").mkdir()
    os.setxattr(root / "userx", "user.overlay.opaque", b"y")  # -o userxattr mount
    (root / "fuse").mkdir()
    os.setxattr(root / "fuse", "trusted.overlay.opaque", b"y")
    (root / "fuse" / ".wh..wh..opq").touch()
    os.mknod(root / "fuse" / ".wh..opq", 0o020000, os.makedev(0, 0))
    (root / "sentinel-only").mkdir()
    (root / "sentinel-only" / ".wh..wh..opq").touch()
    (root / "not-opaque").mkdir()
    os.setxattr(root / "not-opaque", "trusted.overlay.opaque", b"x")  # "has whiteouts" hint only
    os.setxattr(root / "dir" / "file", "trusted.overlay.origin", b"\x00\xfb\x1d")
    os.setxattr(root / "dir", "trusted.overlay.impure", b"y")
    os.setxattr(root / "dir" / "file", "user.fuseoverlayfs.override_stat", b"0:0:0644")
    os.setxattr(root / "dir" / "file", "user.keep", b"kept")
    os.setxattr(root / "dir" / "file", "trusted.keep", b"kept too")
    (root / "revived").write_text("recreated after delete\n")
    (root / ".wh.revived").touch()  # leftover whiteout shadowed by the real entry
    os.mknod(root / "dev", 0o020644, os.makedev(1, 3))  # a real device, not a whiteout
    os.mkfifo(root / "fifo")
    os.symlink("dir/file", root / "sym")
    return root


def test_walk_normalizes_both_conventions(upper: Path) -> None:
    entries = {e.path: e for e in walk_upper(upper)}
    kinds = {path: e.kind for path, e in entries.items()}
    assert kinds == {
        "aufs-gone": "whiteout", "dev": "char", "dir": "dir", "dir/file": "file", "dir/kernel-gone": "whiteout",
        "dir/sub": "dir", "fifo": "fifo", "fuse": "dir", "not-opaque": "dir", "revived": "file",
        "sentinel-only": "dir", "shared-gone": "whiteout", "sym": "symlink", "userx": "dir",
    }
    opaque = {path for path, e in entries.items() if e.opaque}
    assert opaque == {"fuse", "sentinel-only", "userx"}
    assert entries["dir/file"].xattrs == (("trusted.keep", b"kept too"), ("user.keep", b"kept"))
    assert entries["dir"].xattrs == ()
    assert entries["dev"].rdev == (1, 3)
    assert list(entries) == sorted(entries, key=lambda p: [os.fsencode(c) for c in p.split("/")])


def test_tar_output(upper: Path) -> None:
    members = tar_members(upper)
    assert sorted(members) == sorted([
        ".wh.aufs-gone", "dev", "dir", "dir/file", "dir/.wh.kernel-gone", "dir/sub", "fifo", "fuse",
        "fuse/.wh..wh..opq", "not-opaque", "revived", "sentinel-only", "sentinel-only/.wh..wh..opq",
        ".wh.shared-gone", "sym", "userx", "userx/.wh..wh..opq",
    ])
    assert not any(m.islnk() for m in members.values())  # shared whiteout inode is not a link
    assert members["dev"].ischr() and (members["dev"].devmajor, members["dev"].devminor) == (1, 3)
    assert members["dir/file"].pax_headers == {"SCHILY.xattr.trusted.keep": "kept too",
                                               "SCHILY.xattr.user.keep": "kept"}
    for name in (".wh.aufs-gone", "dir/.wh.kernel-gone", "userx/.wh..wh..opq"):
        m = members[name]
        assert (m.isreg(), m.size, m.mode, m.uid, m.gid, m.mtime) == (True, 0, 0o600, 0, 0, 0)


@pytest.mark.root
def test_squashfs_output(upper: Path, tmp_path: Path) -> None:
    require_tool("tar2sqfs")
    out = tmp_path / "layer.sqfs"
    upper_to_squashfs(upper, out, comp="lz4", level=None)
    with mounted("mount", "-t", "squashfs", "-o", "ro,loop", str(out), target=tmp_path / "m") as m:
        found = manifest(m)
        xattrs = {p: {n: os.getxattr(m / p, n) for n in os.listxattr(m / p)} for p in ("fuse", "userx", "dir")}
    whiteouts = {p for p, v in found.items() if v[0] == 0o020000 and v[7] == (0, 0)}
    assert whiteouts == {"aufs-gone", "dir/kernel-gone", "shared-gone"}
    assert not any(".wh." in p for p in found)
    assert found["dev"][7] == (1, 3)
    assert xattrs == {"fuse": {"trusted.overlay.opaque": b"y"}, "userx": {"trusted.overlay.opaque": b"y"},
                      "dir": {}}
    assert found["dir/file"][8] == (("trusted.keep", b"kept too"), ("user.keep", b"kept"))


def test_overlay_xattr_filter() -> None:
    assert is_overlay_xattr("trusted.overlay.origin") and is_overlay_xattr("user.overlay.opaque")
    assert is_overlay_xattr("user.fuseoverlayfs.opaque")
    assert not is_overlay_xattr("user.overlayish") and not is_overlay_xattr("security.overlay.x")


@pytest.mark.parametrize(("name", "words"), [("trusted.overlay.metacopy", "metadata-only copy-up"),
                                             ("trusted.overlay.redirect", "renamed directory")])
def test_uppers_depending_on_their_lowers_are_refused(tmp_path: Path, name: str, words: str) -> None:
    require_root()
    root = tmp_path / "upper"
    (root / "d").mkdir(parents=True)
    os.setxattr(root / "d", name, b"/elsewhere")
    (root / "a-first").write_text("written before the refusal")
    out = io.BytesIO()
    with pytest.raises(OverlayStateError, match=rf"upper/d: cannot convert the overlay upper: {words}"):
        upper_to_tar(root, out)
    data = out.getvalue()
    assert data and not data.endswith(bytes(1024))  # no end-of-archive: never looks complete


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nope: overlay upper is not a directory"):
        upper_to_tar(tmp_path / "nope", io.BytesIO())


def test_sockets_skipped_and_odd_names_kept(tmp_path: Path) -> None:
    root = tmp_path / "upper"
    root.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "s.sock"))
        odd = os.fsencode(root) + b"/caf\xe9-latin1"
        with open(odd, "wb") as f:
            f.write(b"bytes name")
        deep = root
        for _ in range(60):
            deep = deep / "d"
        deep.mkdir(parents=True)
        members = tar_members(root)
    finally:
        sock.close()
    assert "s.sock" not in members
    assert os.fsencode("caf\udce9-latin1") in {os.fsencode(n) for n in members}
    assert "/".join(["d"] * 60) in members


def test_deterministic_and_independent_of_directory_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root, order in ((a, range(30)), (b, reversed(range(30)))):
        root.mkdir()
        for i in order:
            (root / f"f{i:02d}").write_text(str(i))
            os.utime(root / f"f{i:02d}", (1000, 1000))
        os.utime(root, (1000, 1000))
    assert upper_to_tar(a, io.BytesIO()) == upper_to_tar(b, io.BytesIO())


def test_squashfs_failure_leaves_no_output(tmp_path: Path) -> None:
    require_tool("tar2sqfs")
    root = tmp_path / "upper"
    root.mkdir()
    (root / "f").write_text("x")
    out = tmp_path / "out.sqfs"
    with pytest.raises(ExternalToolError) as err:
        upper_to_squashfs(root, out, comp="no-such-compressor")
    assert err.value.tool == "tar2sqfs" and err.value.returncode != 0 and "\n" not in str(err.value)
    assert not out.exists()
    out.write_bytes(b"occupied")
    with pytest.raises(UsageError, match=r"out.sqfs: squashfs output already exists"):
        upper_to_squashfs(root, out)
    assert out.read_bytes() == b"occupied"
