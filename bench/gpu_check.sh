#!/bin/bash
# GPU check for issue 14: `sifoverlay exec --nv --mount kernel IMAGE nvidia-smi -L` on a
# machine that has only Python 3 (3.11+), e2fsprogs, losetup and an NVIDIA driver: no FUSE
# tools, no squashfs-tools, no registry, no busybox needed.
#
#   sudo bench/gpu_check.sh [--fake-nvidia-smi /usr/bin/id]   (from the source tree)
#
# How the image is made without squashfs tools: an OCI layout with NO layer (only a
# config with Env PATH) is imported (`sifoverlay import`, no layer to convert), an ext3
# overlay is added (`sifoverlay overlay create`: mkfs.ext3), and the glibc that
# nvidia-smi needs (its ldd closure, minus the driver's own libraries, which --nv binds)
# is written into the overlay's upper/ with debugfs (e2fsprogs); `overlay sync` records
# the new digest. Then: /proc/filesystems must list squashfs and overlay (kernel mode),
# `sifoverlay exec --nv --mount kernel` runs `nvidia-smi -L` inside, and everything is
# printed. Then the device filter: with CUDA_VISIBLE_DEVICES set to the first GPU (by
# index, then by UUID) and to nothing, `ls /dev` inside must show that GPU's node (or
# none) plus nvidiactl, and nvidia-smi -L inside lists only it (or nothing).
# --fake-nvidia-smi BIN runs the same steps with BIN instead (a machine without a GPU:
# checks all but the driver and the filter). Exit status: that of the command inside (or 1
# on a failed step or filter check).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
CMD=nvidia-smi
ARGS=(-L)
if [ "${1:-}" = "--fake-nvidia-smi" ]; then
	CMD=${2:?--fake-nvidia-smi needs a binary}
	ARGS=()
fi
WORK=$(mktemp -d /tmp/sifoverlay-gpu-check.XXXXXX)
chmod 755 "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export SIFOVERLAY_RUNTIME_DIR="$WORK/run"
sifo() { "$PY" -m sifoverlay "$@"; }
step() { printf '\n== %s\n' "$*"; }
die() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
trap 'rm -rf "$WORK"' EXIT

step "host"
uname -a
"$PY" --version
[ "$(id -u)" = 0 ] || die "run as root (--mount kernel needs root)"
for tool in debugfs mkfs.ext3 e2fsck losetup ldd; do
	command -v "$tool" >/dev/null || die "$tool not found (e2fsprogs / util-linux / libc-bin)"
done
step "/proc/filesystems (kernel mode needs squashfs and overlay)"
grep -wE 'squashfs|overlay|ext3|ext4' /proc/filesystems
for fs in squashfs overlay; do
	grep -qw "$fs" /proc/filesystems || modprobe "$fs" 2>/dev/null || true
	grep -qw "$fs" /proc/filesystems || die "the kernel has no $fs filesystem"
done
grep -qwE 'ext3|ext4' /proc/filesystems || die "the kernel has no ext3/ext4 driver"

step "NVIDIA driver as sifoverlay finds it (ldconfig cache + list, like nvliblist.conf)"
"$PY" - <<'EOF' || die "driver discovery crashed"
from sifoverlay.runtime import gpu
d = gpu.discover()
print(f"{len(d.libraries)} libraries, {len(d.binaries)} binaries, devices: {' '.join(d.devices) or 'none'}")
for soname, path in d.libraries:
    print(f"  lib {soname} -> {path}")
for path in d.binaries:
    print(f"  bin {path}")
EOF
BIN=$(command -v "$CMD") || die "$CMD not found on the host"
LS=$(command -v ls) || die "ls not found on the host"
echo "command: $BIN ${ARGS[*]}"

step "image: OCI layout with no layer -> import -> ext3 overlay -> glibc of $CMD via debugfs"
"$PY" - "$WORK/layout" <<'EOF' || die "writing the OCI layout failed"
import hashlib, json, os, platform, sys
lay = sys.argv[1]
os.makedirs(f"{lay}/blobs/sha256")
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{lay}/blobs/sha256/{d}", "wb").write(data)
    return {"digest": "sha256:" + d, "size": len(data)}
arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
cfg = json.dumps({"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/usr/bin:/bin"]},
                  "rootfs": {"type": "layers", "diff_ids": []}}).encode()
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(cfg)},
                  "layers": []}).encode()
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                              **blob(man)}]}, open(f"{lay}/index.json", "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open(f"{lay}/oci-layout", "w"))
EOF
IMG="$WORK/gpu.oci.sif"
sifo import "$WORK/layout" "$IMG" || die "sifoverlay import"
sifo overlay create --size 64 --journal-dir "$WORK/journal" "$IMG" || die "sifoverlay overlay create"
OFFSET=$("$PY" -c 'import sys; from sifoverlay.ocisif import open_image
with open_image(sys.argv[1]) as img: print(img.overlay.offset)' "$IMG") || die "reading the overlay offset"
# the files: the loader and libraries nvidia-smi links against, not the driver's own
# (and ls, to look at /dev inside)
FILES=$({ ldd "$BIN"; ldd "$LS"; } | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' |
	grep -v -E '/lib(nvidia|cuda)' | sort -u)
FILES="$FILES $LS"
[ "$CMD" = nvidia-smi ] || FILES="$FILES $BIN"  # a fake command is not bound by --nv: put it in
{
	for d in upper/proc upper/dev upper/sys upper/tmp upper/etc upper/usr upper/usr/bin; do echo "mkdir $d"; done
	for f in $FILES; do
		for p in "$f" "$(readlink -f "$f")"; do
			dir=upper
			IFS=/ read -r -a parts <<<"${p#/}"
			for ((i = 0; i < ${#parts[@]} - 1; i++)); do dir="$dir/${parts[i]}"; echo "mkdir $dir"; done
			echo "write $(readlink -f "$f") upper$p"
		done
	done
} >"$WORK/debugfs.cmd"
# mkdir lines first (sorted by path, so parents come before children), then the writes
{ grep '^mkdir' "$WORK/debugfs.cmd" | sort -u -k2; grep '^write' "$WORK/debugfs.cmd" | sort -u; } >"$WORK/debugfs.in"
debugfs -w -f "$WORK/debugfs.in" "$IMG?offset=$OFFSET" 2>&1 | grep -v -E '^debugfs [0-9]|^mkdir|^write|Allocated inode' | head -20
sifo overlay sync --journal-dir "$WORK/journal" "$IMG" || die "sifoverlay overlay sync"
echo "wrote $(grep -c '^write' "$WORK/debugfs.in") files into the overlay"

cd / && step "sifoverlay exec --nv --mount kernel IMAGE $CMD ${ARGS[*]}"
if [ "$CMD" = nvidia-smi ]; then INSIDE=(nvidia-smi); else INSIDE=("$BIN"); fi
sifo exec --allow-root-options --journal-dir "$WORK/journal" --mount kernel --nv --no-home "$IMG" -- \
	"${INSIDE[@]}" "${ARGS[@]}"
rc=$?
echo "exit status: $rc"
step "what the job saw of the driver"
sifo exec --allow-root-options --journal-dir "$WORK/journal" --mount kernel --nv --no-home "$IMG" -- \
	"${INSIDE[@]}" --version 2>&1 | head -3 || true

step "device filter: only the GPUs CUDA_VISIBLE_DEVICES names are in the job's /dev"
FIRST=$("$PY" -c 'from sifoverlay.runtime import gpu; g = gpu.host_gpus(); print(g[0].name if g else "")')
echo "host GPU nodes: $(cd /dev && echo nvidia[0-9]*)"
if [ -z "$FIRST" ]; then
	echo "no /dev/nvidiaN on this host: nothing to filter"
else
	UUID=$(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU 0: .*(UUID: \(GPU-[^)]*\)).*/\1/p')
	SELECTIONS=(0)
	[ -n "$UUID" ] && SELECTIONS+=("$UUID")
	SELECTIONS+=("")
	for sel in "${SELECTIONS[@]}"; do
		want=$FIRST
		[ -z "$sel" ] && want=""
		seen=$(CUDA_VISIBLE_DEVICES=$sel sifo exec --allow-root-options --journal-dir "$WORK/journal" --mount kernel \
			--nv --no-home "$IMG" -- "$LS" /dev | tr '\n' ' ')
		gpus=$(echo "$seen" | tr ' ' '\n' | grep -E '^nvidia[0-9]+$' | tr '\n' ' ' | sed 's/ $//')
		echo "-- CUDA_VISIBLE_DEVICES='$sel': /dev inside: $seen"
		CUDA_VISIBLE_DEVICES=$sel sifo exec --allow-root-options --journal-dir "$WORK/journal" --mount kernel --nv \
			--no-home "$IMG" -- "${INSIDE[@]}" "${ARGS[@]}"
		echo "   $CMD exit status: $?"
		if [ "$gpus" != "$want" ] || ! echo " $seen" | grep -q ' nvidiactl '; then
			echo "gpu_check: FAILED: CUDA_VISIBLE_DEVICES='$sel': GPU nodes inside '$gpus', expected '$want' and nvidiactl" >&2
			rc=1
		fi
	done
fi
exit $rc
