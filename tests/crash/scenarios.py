"""The crash scenarios (pre-state builders + operations), shared by tests/crash and
bench/crash_exhaustive.py.

  create        golden OCI-SIF -> overlay create (sparse 64 MiB)
  sync          overlay written with debugfs -> sync
  seal          upper with files, modes, owners, xattrs, a whiteout, an opaque dir, a
                symlink -> seal; the squashfs content is compared with the upper tree
  sync-dirty    (root) the image copied while the kernel had the overlay mounted rw: the
                ext3 journal needs replay -> sync (e2fsck through a loop device first)
  seal-dirty    (root) the same dirty image -> seal
  seal-unclean  a seal SIGKILLed after its blobs were appended (journal entry, scratch
                squashfs and lease left; the lease expired) -> seal again (recovers first)
  resize        overlay with a file -> resize to 96 MiB (copy, e2fsck + resize2fs, commit)
  compact       a large file written and deleted -> compact (punches in the commit's GC)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from sifoverlay import engine
from sifoverlay.crashsim import file_id, restore_file
from sifoverlay.fsio import CountingIO, FileIO
from tests.conftest import require_tool
from tests.crash import harness
from tests.engine.conftest import kernel_rw_mount, modify_overlay, region

ROOT_ONLY = {"sync-dirty", "seal-dirty"}
REPLAYED_WHY = ("the ext3 region [overlay offset, +size) holds e2fsck's replay of the overlay's own journal "
                "(made durable before hashing, R8); every other byte is the old image")


def _base_source() -> Path:
    try:
        from tests.conftest import engine_base_source  # the engine tests' base OCI-SIF
    except ImportError:
        from tests.conftest import VECTORS

        return VECTORS / "oci-sif/TestUpdate/AddLayer.golden"
    return engine_base_source()


def _golden(work: Path) -> Path:
    image = work / "img" / "image.sif"
    shutil.copyfile(_base_source(), image)
    return image


def _with_overlay(work: Path) -> Path:
    image = _golden(work)
    engine.create_overlay(image, sparse=True, journal_dir=work / "journal")
    return image


def debugfs(image: Path, *commands: str) -> None:
    offset, _ = region(image)
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", delete=False) as f:
        f.write("\n".join(commands) + "\n")
    try:
        proc = subprocess.run(["debugfs", "-w", "-f", f.name, f"{image}?offset={offset}"],
                              capture_output=True, text=True, check=True)
        errors = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
        assert not errors, errors
    finally:
        os.unlink(f.name)


def rich_upper(image: Path, tmp: Path) -> None:
    """Files, modes, owners, xattrs, a whiteout, an opaque dir and a symlink in upper/."""
    payload = tmp / "payload.bin"
    payload.write_bytes(b"sealed content\n" * 300)
    small = tmp / "small.txt"
    small.write_bytes(b"private\n")
    debugfs(
        image,
        f"write {payload} upper/data.bin",
        "mkdir upper/etc",
        f"write {small} upper/etc/secret",
        "sif upper/etc/secret mode 0100600",
        "sif upper/etc/secret uid 1234",
        "sif upper/etc/secret gid 4321",
        "ea_set upper/data.bin user.origin crash-test",
        "cd upper", "mknod gone c 0 0", "cd /",  # debugfs mknod takes a name in the cwd
        "mkdir upper/opaque",
        "ea_set upper/opaque trusted.overlay.opaque y",
        f"write {small} upper/opaque/inside",
        "symlink upper/link data.bin",
    )


def _dirty(work: Path, tmp: Path) -> Path:
    """The overlay image copied while the kernel has it mounted rw (journal needs replay)."""
    from sifoverlay.ext3 import Superblock

    image = _with_overlay(work)
    modify_overlay(image, tmp, b"before the crash\n")
    engine.sync(image, journal_dir=work / "journal")
    crash = tmp / "crash.sif"
    with kernel_rw_mount(image, tmp / "mnt") as (mnt, _dev):
        (mnt / "upper" / "crash").mkdir()
        (mnt / "upper" / "crash" / "data.bin").write_bytes(bytes(range(256)) * 1200)
        subprocess.run(["sync", "-f", str(mnt / "upper" / "crash" / "data.bin")], check=True)
        time.sleep(0.2)
        subprocess.run(["cp", "--sparse=always", str(image), str(crash)], check=True)
    restore_file(str(crash), str(image))
    offset, size = region(image)
    assert Superblock.read(str(image), offset, size=size).needs_recovery
    return image


def _sync(image: Path, journal: Path, io: FileIO) -> object:
    return engine.sync(image, journal_dir=journal, io=io)


def _create(image: Path, journal: Path, io: FileIO) -> object:
    return engine.create_overlay(image, size_mib=64, sparse=True, journal_dir=journal, io=io)


def _seal(image: Path, journal: Path, io: FileIO) -> object:
    return engine.seal(image, journal_dir=journal, io=io)


def _resize(image: Path, journal: Path, io: FileIO) -> object:
    from sifoverlay.engine.resize import resize

    return resize(image, size_mib=96, journal_dir=journal, io=io)


def _compact(image: Path, journal: Path, io: FileIO) -> object:
    from sifoverlay.engine.compact import compact

    return compact(image, journal_dir=journal, io=io)


def _build_resize(work: Path) -> None:
    require_tool("mkfs.ext3", "debugfs", "e2fsck", "resize2fs")
    image = _with_overlay(work)
    modify_overlay(image, work.parent, b"kept across the resize\n" * 2000)
    engine.sync(image, journal_dir=work / "journal")


def _build_compact(work: Path) -> None:
    """A job wrote a large file and deleted it: its blocks are free but still allocated."""
    require_tool("mkfs.ext3", "debugfs")
    image = _with_overlay(work)
    modify_overlay(image, work.parent, bytes(range(256)) * 8192, name="upper/big.bin")
    modify_overlay(image, work.parent, b"stays\n", name="upper/small.txt")
    engine.sync(image, journal_dir=work / "journal")
    debugfs(image, "rm upper/big.bin")
    engine.sync(image, journal_dir=work / "journal")


def _build_create(work: Path) -> None:
    require_tool("mkfs.ext3")
    _golden(work)


def _build_sync(work: Path) -> None:
    require_tool("mkfs.ext3", "debugfs")
    image = _with_overlay(work)
    modify_overlay(image, work.parent, b"written by the job\n")


def _build_seal(work: Path) -> None:
    require_tool("mkfs.ext3", "debugfs", "fuse2fs", "tar2sqfs")
    image = _with_overlay(work)
    rich_upper(image, work.parent)
    engine.sync(image, journal_dir=work / "journal")


def _build_dirty(work: Path) -> None:
    require_tool("mkfs.ext3", "debugfs", "e2fsck", "losetup", "mount")
    _dirty(work, work.parent)


def _build_unclean_seal(work: Path) -> None:
    """A seal killed right after its blobs were appended and fsynced (INTENT on disk,
    BLOBS_DURABLE not yet): journal entry, scratch squashfs, the appended tail."""
    _build_seal(work)
    image, journal = work / "img" / "image.sif", work / "journal"
    pristine = work.parent / "pristine.sif"
    shutil.copyfile(image, pristine)
    probe = CountingIO(keep_log=True, name_fds=True)
    engine.seal(image, journal_dir=journal, io=probe)
    restore_file(str(pristine), str(image))
    ops = probe.log
    first = next(i for i, (op, info) in enumerate(ops) if op in ("pwrite", "truncate") and info.get("path") == str(image))
    cut = next(i for i in range(first, len(ops)) if ops[i][0] == "fsync" and ops[i][1].get("path") == str(image)) + 2
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            engine.seal(image, journal_dir=journal, io=CountingIO(cut, mode="kill"))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), status
    harness.sweep_seal_mounts()
    assert [n for n in os.listdir(journal) if n.endswith(".sovj")], "the killed seal left no journal entry"
    UNCLEAN_ORIGINAL[str(work)] = file_id(str(pristine))


UNCLEAN_ORIGINAL: dict[str, str] = {}

BUILDERS = {
    "create": (_build_create, _create),
    "sync": (_build_sync, _sync),
    "seal": (_build_seal, _seal),
    "sync-dirty": (_build_dirty, _sync),
    "seal-dirty": (_build_dirty, _seal),
    "seal-unclean": (_build_unclean_seal, _seal),
    "resize": (_build_resize, _resize),
    "compact": (_build_compact, _compact),
}
NAMES = tuple(BUILDERS)


def make(name: str, base: Path) -> harness.Scenario:
    """Build, run the reference, and name the justified extra end states."""
    build, run = BUILDERS[name]
    s = harness.Scenario(name, build, run, seal_mounts=name.startswith("seal"))
    s.prepare(base)
    if name.endswith("-dirty"):
        snaps, _ = s.tools[1]  # the first external tool of a dirty scenario is e2fsck on the image
        assert [op for op, info in s.log if op == "external"][0] and list(snaps) == [str(s.image)], snaps
        replayed = snaps[str(s.image)]
        assert replayed is not None
        s.allow(file_id(replayed), "replayed", REPLAYED_WHY)
    if name == "seal-unclean":
        s.allow(UNCLEAN_ORIGINAL[str(s.work)], "rolled-back",
                "the interrupted seal of the pre-state is rolled back by recovery: exactly the image before it")
    if name.startswith("seal"):
        check_squashfs_equals_upper(s)
    return s


# --- seal: squashfs content == the overlay's upper tree ------------------------------------------
def _tree_of_upper(image: Path) -> dict[str, tuple[object, ...]]:
    from sifoverlay.engine.seal import mounted_ro

    offset, _ = region(image)
    out: dict[str, tuple[object, ...]] = {}
    with mounted_ro(str(image), offset) as mnt:
        upper = Path(mnt) / "upper"
        out["."] = _describe(upper)
        for dirpath, dirnames, filenames in os.walk(upper):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                out[str(path.relative_to(upper))] = _describe(path)
    return out


def _describe(path: Path) -> tuple[object, ...]:
    import stat as st_mod

    st = os.lstat(path)
    xattrs = {}
    if not st_mod.S_ISLNK(st.st_mode):
        for name in os.listxattr(path, follow_symlinks=False):
            xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
    content: object = None
    if st_mod.S_ISREG(st.st_mode):
        content = harness.digest(path.read_bytes())
    elif st_mod.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    elif st_mod.S_ISCHR(st.st_mode):
        content = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return (st_mod.S_IFMT(st.st_mode), st_mod.S_IMODE(st.st_mode), st.st_uid, st.st_gid, tuple(sorted(xattrs.items())), content)


def _tree_of_squashfs(sqfs: Path, tmp: Path) -> dict[str, tuple[object, ...]]:
    import stat as st_mod

    tar = tmp / "layer.tar"
    subprocess.run(["sqfs2tar", str(sqfs)], stdout=tar.open("wb"), check=True)
    kinds = {tarfile.DIRTYPE: st_mod.S_IFDIR, tarfile.REGTYPE: st_mod.S_IFREG, tarfile.SYMTYPE: st_mod.S_IFLNK,
             tarfile.CHRTYPE: st_mod.S_IFCHR}
    out: dict[str, tuple[object, ...]] = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            rel = m.name.rstrip("/") or "."
            rel = rel[2:] if rel.startswith("./") else rel
            xattrs = tuple(sorted((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                                  for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")))
            content: object = None
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                content = harness.digest(f.read())
            elif m.issym():
                content = m.linkname
            elif m.ischr():
                content = (m.devmajor, m.devminor)
            out[rel] = (kinds[m.type], m.mode & 0o7777, m.uid, m.gid, xattrs, content)
    # sqfs2tar has no entry for the root directory: rdsquashfs -s / and -x / describe it
    stat_text = subprocess.run(["rdsquashfs", "-s", "/", str(sqfs)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in stat_text.splitlines() if ":" in line)
    assert fields["Inode type"].strip() == "directory", stat_text
    root_x = subprocess.run(["rdsquashfs", "-x", "/", str(sqfs)], capture_output=True, check=True).stdout
    root_xattrs = tuple(sorted((k, v.encode()) for k, v in (line.split("=", 1) for line in root_x.decode().splitlines() if "=" in line)))
    out["."] = (st_mod.S_IFDIR, int(fields["Access"].strip(), 8), int(fields["UID"].split()[0]),
                int(fields["GID"].split()[0]), root_xattrs, None)
    return out


def check_squashfs_equals_upper(s: harness.Scenario) -> None:
    """The sealed layer holds exactly the upper tree: names, types, modes, owners, xattrs,
    file bytes, symlink targets, whiteouts (char 0:0) and the opaque marker. Named
    difference: times (tar2sqfs --no-keep-time writes 0 on purpose, deterministic layers)."""
    from sifoverlay.ocisif import mediatypes, open_image

    tmp = s.base / "sealcheck"
    tmp.mkdir(exist_ok=True)
    s.restore()
    if s.name.endswith("-dirty"):  # the upper that was sealed is the replayed one (fuse2fs cannot replay)
        snaps, _ = s.tools[1]
        replayed = tmp / "replayed.sif"
        restore_file(next(iter(snaps.values())), str(replayed))
        upper = _tree_of_upper(replayed)
    else:
        upper = _tree_of_upper(s.image)
    with open_image(s.new_copy) as img:
        assert img.overlay is None
        layer = img.layers[-1]
        assert layer.media_type == mediatypes.SQUASHFS_LAYER
        sqfs = tmp / "layer.sqfs"
        with sqfs.open("wb") as out:
            for chunk in img.sif.iter_chunks(layer.descriptor):
                out.write(chunk)
    sealed = _tree_of_squashfs(sqfs, tmp)
    assert sealed == upper, {k: (upper.get(k), sealed.get(k)) for k in set(upper) | set(sealed) if upper.get(k) != sealed.get(k)}
    if s.name == "seal":  # the rich upper really has every kind of entry
        import stat as st_mod

        kinds = {v[0] for v in upper.values()}
        assert {st_mod.S_IFDIR, st_mod.S_IFREG, st_mod.S_IFLNK, st_mod.S_IFCHR} <= kinds
        assert upper["etc/secret"][1:4] == (0o600, 1234, 4321)
        assert ("trusted.overlay.opaque", b"y") in upper["opaque"][4]
        assert ("user.origin", b"crash-test") in upper["data.bin"][4]
    shutil.rmtree(tmp)
