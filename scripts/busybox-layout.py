#!/usr/bin/env python3
"""Build a small runnable OCI image layout from Debian's busybox-static (/bin/busybox).

    busybox-layout.py LAYOUT [--busybox /bin/busybox] [--tag busybox] [--layers 1|2] [--no-busybox]

The demo and the tests use it instead of a downloaded image: `sifoverlay import LAYOUT
OUT.oci.sif` makes the OCI-SIF. Layer 1 is a root filesystem with /bin/busybox and one
hard link per applet (`busybox --list`), /etc/passwd and /etc/group, and the usual empty
directories; `--layers 2` adds a second layer (/etc/motd, /etc/hostname) so that images
with more than one layer can be made too. Uncompressed tar layers, every timestamp is
SOURCE_DATE_EPOCH (default 0) and every entry is owned by root: the same busybox binary
gives byte-identical layouts. `--no-busybox` leaves the binary and its links out (a tiny,
not runnable image, for benchmarks that clone thousands of images). Standard library only
(python3 of the system is enough).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}

DIRS = [  # (path, mode)
    ("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("home", 0o755), ("proc", 0o755),
    ("root", 0o700), ("sys", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755),
    ("usr/sbin", 0o755), ("var", 0o755), ("var/tmp", 0o1777),
]
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class Layer:
    def __init__(self, mtime: int) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.mtime = mtime

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, self.mtime
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def dir(self, name: str, mode: int) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def hardlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.LNKTYPE, 0o755)
        info.linkname = target
        self.tar.addfile(info)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def applets(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    names = sorted({n.strip() for n in out.split() if n.strip() and "/" not in n})
    if "sh" not in names:
        raise SystemExit(f"busybox-layout: {busybox} has no 'sh' applet")
    return [n for n in names if n != "busybox"]


def rootfs_layer(busybox: str | None, mtime: int) -> bytes:
    layer = Layer(mtime)
    for name, mode in DIRS:
        layer.dir(name, mode)
    if busybox is not None:
        with open(busybox, "rb") as f:
            layer.file("bin/busybox", f.read(), 0o755)
        for name in applets(busybox):
            layer.hardlink(f"bin/{name}", "bin/busybox")
    layer.file("etc/passwd", PASSWD.encode())
    layer.file("etc/group", GROUP.encode())
    layer.file("etc/hosts", b"")
    layer.file("etc/resolv.conf", b"")
    return layer.bytes()


def extra_layer(mtime: int) -> bytes:
    layer = Layer(mtime)
    layer.dir("etc", 0o755)
    layer.file("etc/motd", b"busybox image built by oci-sif-overlay's scripts/busybox-layout.py\n")
    layer.file("etc/hostname", b"busybox\n")
    return layer.bytes()


def write_blob(layout: str, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(layout: str, busybox: str | None, tag: str, nlayers: int, mtime: int) -> str:
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    layers = [rootfs_layer(busybox, mtime)] + ([extra_layer(mtime)] if nlayers == 2 else [])
    descs = [{"mediaType": OCI_LAYER, **write_blob(layout, data)} for data in layers]
    arch = GOARCH.get(os.uname().machine, os.uname().machine)
    created = "%04d-%02d-%02dT%02d:%02d:%02dZ" % tuple(__import__("time").gmtime(mtime)[:6])
    config = {
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},  # uncompressed: diff_id == digest
        "history": [{"created": created, "created_by": "scripts/busybox-layout.py"} for _ in descs],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **write_blob(layout, canonical(config))},
        "layers": descs,
    }
    mdesc = {"mediaType": OCI_MANIFEST, **write_blob(layout, canonical(manifest)),
             "annotations": {"org.opencontainers.image.ref.name": tag},
             "platform": {"architecture": arch, "os": "linux"}}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [mdesc]}
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(canonical(index))
    return str(mdesc["digest"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layout", help="directory to write (created; must be empty or absent)")
    ap.add_argument("--busybox", default="/bin/busybox", help="static busybox binary [/bin/busybox]")
    ap.add_argument("--tag", default="busybox", help="ref name in index.json [busybox]")
    ap.add_argument("--layers", type=int, choices=(1, 2), default=1)
    ap.add_argument("--no-busybox", action="store_true", help="leave /bin/busybox out (not runnable)")
    args = ap.parse_args(argv)
    if not args.no_busybox and not os.path.isfile(args.busybox):
        print(f"busybox-layout: {args.busybox} not found (apt-get install busybox-static)", file=sys.stderr)
        return 1
    if os.path.exists(args.layout) and os.listdir(args.layout):
        print(f"busybox-layout: {args.layout} is not empty", file=sys.stderr)
        return 1
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    print(build(args.layout, None if args.no_busybox else args.busybox, args.tag, args.layers, mtime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
