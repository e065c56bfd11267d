"""Randomised layer stacks (fixed seeds, so failures reproduce): files, directories,
symlinks, hard links within and across layers, whiteouts and opaque markers, in random
order. Each stack is imported, mounted and compared with the reference applier.

The generator stays away from the cases the image spec leaves open (a path twice in one
layer, a hard link to something the same layer deletes)."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from sifoverlay.ocisif.importer import import_image
from sifoverlay.ocisif import open_image
from tests.conftest import require_root, require_tool

from .reftree import ReferenceTree, entry, make_tar, mounted_stack, reference_snapshot, snapshot_dir, write_layout

pytestmark = pytest.mark.root

DIRS = ("d0", "d1", "d0/e0", "d0/e1", "d1/e0")
LEAVES = ("f0", "f1", "f2")
SEEDS = range(24)


def _existing_files(tree: ReferenceTree) -> list[str]:
    entries, _ = tree.snapshot()
    return sorted(p for p, record in entries.items() if record[0] == "file")


def _existing_dirs(tree: ReferenceTree) -> list[str]:
    entries, _ = tree.snapshot()
    return sorted(p for p, record in entries.items() if record[0] == "dir" and p)


def _layer(rng: random.Random, tree: ReferenceTree) -> bytes:
    """One random layer valid for the state `tree` (which it then updates)."""
    used: set[str] = set()
    deleted: set[str] = set()
    items: list[tuple[tarfile.TarInfo, bytes | None]] = []
    lower_files = _existing_files(tree)
    for _ in range(rng.randint(2, 9)):
        op = rng.choice(["file", "file", "dir", "symlink", "whiteout", "opaque", "hardlink", "hardlink"])
        directory = rng.choice(DIRS)
        path = f"{directory}/{rng.choice(LEAVES)}"
        if op == "dir":
            if directory in used:
                continue
            used.add(directory)
            items.append((entry(directory, "dir", mode=rng.choice([0o755, 0o700, 0o1777]), uid=rng.randint(0, 3)), None))
        elif op in ("file", "symlink"):
            if path in used or path in deleted:
                continue
            used.add(path)
            if op == "file":
                content = f"{path} {rng.random()}\n".encode()
                items.append((entry(path, mode=rng.choice([0o644, 0o600, 0o755]), gid=rng.randint(0, 3),
                                    xattrs={"user.k": str(rng.randint(0, 9))} if rng.random() < 0.3 else None), content))
            else:
                items.append((entry(path, "symlink", link=rng.choice(["../x", "/abs/y", "z"])), None))
        elif op == "whiteout":
            target = rng.choice(lower_files + _existing_dirs(tree) + [path])
            if target in used or any(u.startswith(target + "/") for u in used):
                continue
            deleted.add(target)
            parent, _, base = target.rpartition("/")
            items.append((entry(f"{parent}/.wh.{base}" if parent else f".wh.{base}"), b""))
        elif op == "opaque":
            dirs = _existing_dirs(tree)
            if not dirs:
                continue
            target = rng.choice(dirs)
            if any(u.startswith(target + "/") for u in used) or target in deleted:
                continue
            deleted.add(target + "/*")
            items.append((entry(f"{target}/.wh..wh..opq"), b""))
        elif op == "hardlink":
            if path in used or path in deleted:
                continue
            same_layer = [i.name for i, _ in items
                          if i.isreg() and i.name != path and not i.name.rpartition("/")[2].startswith(".wh.")]
            candidates = [f for f in lower_files if not _is_deleted(f, deleted) and f != path] + same_layer
            if not candidates:
                continue
            used.add(path)
            items.append((entry(path, "hardlink", link=rng.choice(candidates)), None))
    # keep later whiteouts from hitting what this layer already linked to
    linked = {i.linkname for i, _ in items if i.islnk()}
    items = [(i, d) for i, d in items if not _whiteout_hits(i.name, linked)]
    raw = make_tar(items)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        tree.apply_tar(tf)
    return raw


def _is_deleted(path: str, deleted: set[str]) -> bool:
    return any(path == d or path.startswith(d + "/") or (d.endswith("/*") and path.startswith(d[:-1])) for d in deleted)


def _whiteout_hits(name: str, linked: set[str]) -> bool:
    parent, _, base = name.rpartition("/")
    if base == ".wh..wh..opq":
        return any(l.startswith(parent + "/") for l in linked)
    if base.startswith(".wh."):
        target = f"{parent}/{base[4:]}" if parent else base[4:]
        return any(l == target or l.startswith(target + "/") for l in linked)
    return False


@pytest.mark.parametrize("seed", SEEDS)
def test_random_stack(seed: int, tmp_path: Path) -> None:
    require_root()
    require_tool("losetup", "mount", "tar2sqfs", "sqfs2tar")
    rng = random.Random(seed)
    tree = ReferenceTree()
    layers = [_layer(rng, tree) for _ in range(rng.randint(2, 4))]
    source = write_layout(tmp_path / "layout", [{"layers": [("application/vnd.oci.image.layer.v1.tar", raw)
                                                            for raw in layers]}])
    from .reftree import layout_layers

    expected = reference_snapshot(layout_layers(source))
    assert expected == tree.snapshot()
    for squash in (False, True):
        out = tmp_path / f"out-{squash}.oci.sif"
        import_image(source, out, squash=squash)
        with open_image(out) as image:
            ranges = [(layer.offset, layer.size) for layer in image.layers]
        with mounted_stack(out, ranges) as merged:
            assert snapshot_dir(merged) == expected, f"seed {seed} squash={squash}"
