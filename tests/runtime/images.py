"""Test images for the runtime: the busybox vector as an OCI-SIF with an ext3 overlay,
plus crafted variants (corrupt superblock, huge inode count, symlink loops)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import struct
import subprocess
from pathlib import Path

from sifoverlay import engine
from sifoverlay.ocisif import jsonedit, open_image
from sifoverlay.ocisif.build import write_ocisif
from sifoverlay.ocisif.importer import import_image
from sifoverlay.ocisif.mediatypes import SQUASHFS_LAYER

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"



def ldd_deps(path: str) -> set[str]:
    """The existing absolute paths `ldd` names for `path` (its shared libraries and loader)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    return {word for line in out.splitlines() for word in line.split()
            if word.startswith("/") and os.path.exists(word)}

def run(*argv: str) -> None:
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)


def imported_vector(vectors: Path, out: Path, journal: Path) -> Path:
    """`import` of the busybox vector + `overlay create` (the product path)."""
    import_image(vectors / "singularity" / "busybox_amd64.sif", out)
    engine.create_overlay(out, size_mib=64, sparse=True, journal_dir=journal)
    return out


def busybox_rootfs(image: Path, work: Path) -> Path:
    """The rootfs of `image` (an OCI-SIF: tests/conftest.py busybox_image) unpacked, without
    xattrs (an unprivileged fuse-overlayfs cannot copy up trusted.* ones: see runtime.assemble)."""
    imported = work / "vector.oci.sif"
    shutil.copyfile(image, imported)
    with open_image(imported) as img:
        offset = img.layers[0].offset
    root = work / "rootfs"
    run("unsquashfs", "-q", "-no-xattrs", "-n", "-o", str(offset), "-d", str(root), str(imported))
    imported.unlink()
    return root


def build_image(rootfs: Path, out: Path, journal: Path, *, owner: tuple[int, int] | None = None,
                overlay: bool = True, image_config: dict[str, object] | None = None) -> Path:
    """OCI-SIF with one squashfs layer made from `rootfs` and a 64 MiB sparse overlay."""
    layer = out.with_suffix(".sqfs")
    run("mksquashfs", str(rootfs), str(layer), "-noappend", "-no-xattrs", "-quiet", "-no-progress")
    data = layer.read_bytes()
    layer_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config = jsonedit.canonical({
        "architecture": "amd64", "os": "linux",
        "config": image_config if image_config is not None else {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    })
    config_ref = {"mediaType": OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)}
    manifest = jsonedit.canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_ref,
        "layers": [{"mediaType": SQUASHFS_LAYER, "digest": layer_digest, "size": len(data)}],
    })
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(), "size": len(manifest)}]}
    write_ocisif(out, [layer, config, manifest], index)
    layer.unlink()
    if overlay:
        engine.create_overlay(out, size_mib=64, sparse=True, journal_dir=journal)
    if owner:
        os.chown(out, *owner)
    return out


def copy_image(src: Path, dst: Path) -> Path:
    run("cp", "--sparse=always", "--preserve=mode,ownership", str(src), str(dst))
    return dst


def overlay_region(image: Path) -> tuple[int, int]:
    with open_image(image) as img:
        assert img.overlay is not None
        return img.overlay.offset, img.overlay.size


def poke(image: Path, offset: int, data: bytes) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def corrupt_superblock(image: Path) -> None:
    """Zero the ext3 magic (offset 56 of the superblock at region + 1024)."""
    offset, _ = overlay_region(image)
    poke(image, offset + 1024 + 56, b"\0\0")


def huge_inode_count(image: Path) -> None:
    """s_inodes_count = 0xFFFFFF00: still self-consistent for a superblock parser
    (free inodes <= count), impossible for the group layout."""
    offset, _ = overlay_region(image)
    poke(image, offset + 1024, struct.pack("<I", 0xFFFFFF00))


def add_symlink_loops(rootfs: Path) -> None:
    loop = rootfs / "loop"
    loop.mkdir()
    os.symlink("b", loop / "a")
    os.symlink("a", loop / "b")
    os.symlink("selfloop", rootfs / "selfloop")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def clone_tree(src: Path, dst: Path) -> Path:
    run("cp", "-a", str(src), str(dst))  # keeps busybox's hard links (copytree would not)
    return dst


def add_host_binaries(rootfs: Path, names: list[str], *, extra_libs: tuple[str, ...] = ()) -> None:
    """Copy host binaries (found in PATH) into `rootfs` at the same paths, with their `ldd`
    closure and `extra_libs` (e.g. libnss_files), and a plain nsswitch.conf: a dynamic
    glibc inside the busybox image (busybox-static's own resolver cannot read /etc/hosts)."""
    files: set[str] = set()
    for name in names:
        path = shutil.which(name)
        assert path, f"{name} not found on the host"
        files.add(os.path.realpath(path))
        files.add(path)
    for lib in extra_libs:
        if os.path.exists(lib):
            files.add(lib)
    for binary in sorted(files):
        files |= ldd_deps(binary)
    for path in sorted(files):
        for source in {path, os.path.realpath(path)}:
            target = rootfs / source.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copy2(os.path.realpath(source), target)
    (rootfs / "etc" / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")


def overlay_tree(image: Path, tmp: Path) -> str:
    """sha256 over the overlay's tree (path, type, mode, owner, content; no timestamps:
    every run writes the superblock's mount times)."""
    offset, _ = overlay_region(image)
    out = tmp / f"dump-{secrets.token_hex(4)}"
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", f"{image}?offset={offset}"], check=True,
                   capture_output=True)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(out):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            st = path.lstat()
            rel = str(path.relative_to(out))
            if rel == "lost+found":
                continue
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0".encode())
            if path.is_file() and not path.is_symlink():
                h.update(path.read_bytes())
    shutil.rmtree(out)
    return h.hexdigest()


OPENMPI_TREES = ("/usr/lib/x86_64-linux-gnu/openmpi", "/usr/lib/x86_64-linux-gnu/pmix2", "/usr/share/openmpi",
                 "/usr/share/pmix", "/etc/openmpi")
# Debian's MPICH 4.0 (ch4:ucx): its PMI-1 client is built into libmpich (it talks to Slurm's
# mpi/pmi2 plugin over PMI_FD, no libpmi2 needed); UCX dlopens its transports from ucx/.
MPICH_TREES = ("/usr/lib/x86_64-linux-gnu/ucx",)

# The MPI hello world the MPI tests run inside an image (tests/slurm, tests/cluster): each
# rank prints its rank and host name. With --ring each rank first passes its host name to
# the next one round a ring, so that every rank really talks to a rank on another node
# (MPI_Init alone opens no connection between ranks).
MPI_HELLO = r"""
#include <mpi.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
	int rank, size, len;
	char host[MPI_MAX_PROCESSOR_NAME] = "", left[MPI_MAX_PROCESSOR_NAME] = "";
	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	MPI_Get_processor_name(host, &len);
	if (argc > 1 && !strcmp(argv[1], "--ring")) {
		MPI_Sendrecv(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, (rank + 1) % size, 0,
			     left, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, (rank + size - 1) % size, 0,
			     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
		printf("rank %d of %d on %s (from rank %d on %s)\n", rank, size, host, (rank + size - 1) % size, left);
	} else {
		printf("rank %d of %d on %s\n", rank, size, host);
	}
	MPI_Finalize();
	return 0;
}
"""
# flavour -> (the MPI's own compiler wrapper, never the `mpicc` alternative; its trees)
MPI_FLAVOURS = {"openmpi": ("mpicc.openmpi", OPENMPI_TREES), "mpich": ("mpicc.mpich", MPICH_TREES)}


def mpi_hello_image(busybox: Path, work: Path, flavour: str) -> Path:
    """A busybox image with Debian's `flavour` MPI (ldd closure + its plugin trees) and the
    MPI hello world at /usr/local/bin/mpi-hello, no overlay (the MPI tests mount it :ro)."""
    compiler, trees = MPI_FLAVOURS[flavour]
    work.mkdir()
    (work / "hello.c").write_text(MPI_HELLO)
    hello = str(work / "hello")
    run(compiler, "-o", hello, str(work / "hello.c"))
    tree = busybox_rootfs(busybox, work)
    add_host_tree(tree, [hello], trees=trees, rename={hello: "/usr/local/bin/mpi-hello"})
    return build_image(tree, work / f"mpi-{flavour}.oci.sif", work / "journal", overlay=False)


def add_host_tree(rootfs: Path, binaries: list[str], *, trees: tuple[str, ...] = (),
                  rename: dict[str, str] | None = None) -> None:
    """Copy host files into `rootfs`: `binaries` (at the same path, or `rename`d) and whole
    directory `trees` (relative symlinks kept), plus the `ldd` closure of every ELF file
    among them, as plain files at the paths ldd names (Debian's MPI into a busybox image:
    its plugins are dlopen'd, so their closure counts too)."""
    rename = rename or {}
    copies: dict[str, str] = {}  # host file -> path inside
    for binary in binaries:
        copies[binary] = rename.get(binary, binary)
    for top in trees:
        for root, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                copies[path] = path
    closure: set[str] = set()
    for path in list(copies):
        closure |= ldd_deps(path)
    for host, inside in sorted(copies.items()):
        target = rootfs / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            continue
        if os.path.islink(host) and not os.readlink(host).startswith("/"):
            os.symlink(os.readlink(host), target)
        else:
            shutil.copy2(os.path.realpath(host), target)
    for lib in sorted(closure - set(copies)):
        target = rootfs / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() and not target.is_symlink():
            shutil.copy2(os.path.realpath(lib), target)
