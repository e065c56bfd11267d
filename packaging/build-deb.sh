#!/usr/bin/env bash
# Build the Debian package `sifoverlay` from this repository (Debian 12, amd64; dpkg-deb).
#
#   packaging/build-deb.sh [OUTDIR]     -> OUTDIR/sifoverlay_<version>_<arch>.deb (default: dist/)
#   packaging/build-deb.sh --source-id  -> print the id of the sources the package is built from
#
# What the package installs (docs/install.md explains how to use it on a cluster):
#   /opt/sifoverlay/                 a Python venv (Debian's /usr/bin/python3) holding the
#                                    sifoverlay package and its dependencies (from PyPI at build time)
#   /usr/bin/sifoverlay              -> /opt/sifoverlay/bin/sifoverlay
#   /usr/lib/sifoverlay/sifoverlay_spank.so   the SPANK plugin, built against this host's Slurm
#   /usr/lib/sifoverlay/prolog, epilog        the Slurm Prolog/Epilog (interpreter filled in)
#   /lib/systemd/system/sifoverlay-slurm-sweeper.{service,timer}, sifoverlay-exporter.service
#   /etc/default/sifoverlay-exporter          exporter arguments (conffile)
#   /usr/share/doc/sifoverlay/examples/       plugstack line (commented), slurmd drop-in
#   /var/lib/sifoverlay                       state directory, root:root 0755
# Units are installed, not enabled: the admin enables them (docs/install.md).
#
# Environment: PYTHON (interpreter the venv is made from, default /usr/bin/python3),
# PIP_EXTRAS (default metrics,slurm,registry), SLURM_INCLUDE (default /usr/include).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PKG=sifoverlay
PREFIX=/opt/sifoverlay
PLUGIN_DIR=/usr/lib/sifoverlay
RUNTIME_DIR=/run/sifoverlay
PYTHON=${PYTHON:-/usr/bin/python3}
EXTRAS=${PIP_EXTRAS:-metrics,slurm,registry}
log() { printf '[build-deb] %s\n' "$*" >&2; }
die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }

# Everything the package is made of: a change to any of these makes a different id
# (slurm_plugin/dev-cluster rebuilds and reinstalls the package when the id changes).
source_id() {
	{
		find sifoverlay slurm_plugin/src slurm_plugin/hooks slurm_plugin/systemd packaging \
			-type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0
		printf '%s\0' pyproject.toml slurm_plugin/Makefile slurm_plugin/spank_sifoverlay.lds \
			slurm_plugin/plugstack.conf.example slurm_plugin/job_submit.lua LICENSE README.md
	} | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

if [ "${1:-}" = --source-id ]; then source_id; exit 0; fi
OUTDIR=${1:-$REPO/dist}
[ "$(id -u)" = 0 ] || log "not root: files are recorded as root:root anyway (dpkg-deb --root-owner-group)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (a Debian system has it: package dpkg)"
[ -e "${SLURM_INCLUDE:-/usr/include}/slurm/spank.h" ] || die "slurm/spank.h not found (apt-get install libslurm-dev)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "$PYTHON cannot make venvs (apt-get install python3-venv)"

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
[ -n "$VERSION" ] || die "no version in pyproject.toml"
ARCH=$(dpkg --print-architecture)
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
SLURM_VERSION=$(dpkg-query -W -f='${Version}' libslurm-dev 2>/dev/null || true)
SLURM_MAJOR=$(printf '%s' "$SLURM_VERSION" | sed -n 's/^\([0-9]*\.[0-9]*\)\..*/\1/p')
ID=$(source_id)
DEB_VERSION="$VERSION-1"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sifoverlay-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT/DEBIAN"

log "SPANK plugin (Slurm ${SLURM_VERSION:-headers of unknown version})"
cp -a slurm_plugin "$WORK/plugin-src"
rm -rf "$WORK/plugin-src/build" "$WORK/plugin-src"/*.so
make -s -C "$WORK/plugin-src" ${SLURM_INCLUDE:+SLURM_INCLUDE="$SLURM_INCLUDE"} >&2
install -D -m 0755 "$WORK/plugin-src/sifoverlay_spank.so" "$ROOT$PLUGIN_DIR/sifoverlay_spank.so"

log "Prolog/Epilog"
for hook in prolog epilog; do
	sed -e "s|@PYTHON@|$PREFIX/bin/python|g" -e "s|@RUNTIME_DIR@|$RUNTIME_DIR|g" "slurm_plugin/hooks/$hook.in" \
		>"$ROOT$PLUGIN_DIR/$hook"
	chmod 0755 "$ROOT$PLUGIN_DIR/$hook"
done

log "Python venv at $PREFIX ($("$PYTHON" --version), extras $EXTRAS)"
"$PYTHON" -m venv "$WORK/venv-build"
"$WORK/venv-build/bin/pip" install -q --disable-pip-version-check build >&2
rm -rf "$WORK/src" && mkdir "$WORK/src"
# build the wheel from a copy (no egg-info or build/ left in the tree)
tar -cf - --exclude=.venv --exclude=.tools --exclude=.git --exclude=dist --exclude=build --exclude='*.egg-info' \
	--exclude=__pycache__ --exclude=demo-out . | tar -xf - -C "$WORK/src"
"$WORK/venv-build/bin/python" -m build -q --wheel --outdir "$WORK/wheel" "$WORK/src" >&2
WHEEL=$(ls "$WORK"/wheel/*.whl)
STAGE=$ROOT$PREFIX
"$PYTHON" -m venv "$STAGE"
"$STAGE/bin/pip" install -q --disable-pip-version-check --no-compile "$WHEEL[$EXTRAS]" >&2
"$STAGE/bin/python" -m sifoverlay --help >/dev/null || die "the staged venv cannot run sifoverlay"
"$STAGE/bin/pip" uninstall -q -y pip >&2 # not needed at run time
# a venv records its own path (script shebangs, activate): rewrite it to the installed one
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} + # postinst compiles at the final path
# pip's record of where the wheel came from (this build's temp dir): not the installed system's business
for f in "$STAGE"/lib/python*/site-packages/*.dist-info/direct_url.json; do
	[ -e "$f" ] || continue
	sed -i '/\/direct_url.json,/d' "$(dirname "$f")/RECORD"
	rm -f "$f"
done
grep -rlIF "$STAGE" "$STAGE" | while read -r f; do sed -i "s|$STAGE|$PREFIX|g" "$f"; done
if grep -rqF "$STAGE" "$STAGE"; then die "the staging path is left in: $(grep -rlF "$STAGE" "$STAGE" | head -n3)"; fi
mkdir -p "$ROOT/usr/bin"
ln -s "$PREFIX/bin/sifoverlay" "$ROOT/usr/bin/sifoverlay"

log "systemd units, defaults, docs, examples"
install -D -m 0644 slurm_plugin/systemd/sifoverlay-slurm-sweeper.service "$ROOT/lib/systemd/system/sifoverlay-slurm-sweeper.service"
install -D -m 0644 slurm_plugin/systemd/sifoverlay-slurm-sweeper.timer "$ROOT/lib/systemd/system/sifoverlay-slurm-sweeper.timer"
install -D -m 0644 slurm_plugin/systemd/sifoverlay-exporter.service "$ROOT/lib/systemd/system/sifoverlay-exporter.service"
install -D -m 0644 slurm_plugin/systemd/sifoverlay-exporter.default "$ROOT/etc/default/sifoverlay-exporter"
DOC=$ROOT/usr/share/doc/$PKG
install -d "$DOC/examples"
install -m 0644 slurm_plugin/plugstack.conf.example "$DOC/examples/plugstack-sifoverlay.conf"
install -m 0644 slurm_plugin/job_submit.lua "$DOC/examples/job_submit.lua"  # docs/slurm.md "Writers queue"
install -m 0644 slurm_plugin/systemd/slurmd-sifoverlay-sweeper.conf "$DOC/examples/slurmd-sifoverlay-sweeper.conf"
install -m 0644 docs/*.md "$DOC/"
install -m 0644 README.md "$DOC/README.md"
{
	echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
	echo "Upstream-Name: oci-sif-overlay"
	echo
	echo "Files: *"
	echo "Copyright: The oci-sif-overlay authors"
	echo "License: BSD-3-Clause"
	sed 's/^$/./; s/^/ /' LICENSE
	echo
	echo "Files: opt/sifoverlay/lib/*"
	echo "Copyright: the authors of each Python distribution (see its *.dist-info)"
	echo "License: various (see each *.dist-info/LICENSE* or METADATA)"
} >"$DOC/copyright"
install -d -m 0755 "$ROOT/var/lib/sifoverlay"
install -d "$ROOT/usr/share/$PKG"
printf '%s\n' "$ID" >"$ROOT/usr/share/$PKG/source-id"

DEPENDS="python$PYVER, libc6, e2fsprogs, fuse2fs, fuse3, squashfs-tools, squashfuse, fuse-overlayfs, util-linux"
if [ -n "$SLURM_MAJOR" ]; then
	# a SPANK plugin only loads into the Slurm major release it was built against
	NEXT=$(printf '%s' "$SLURM_MAJOR" | awk -F. '{printf "%d.%02d", $1, $2 + 1}')
	DEPENDS="$DEPENDS, slurm-client (>= $SLURM_MAJOR), slurm-client (<< $NEXT)"
fi
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat >"$ROOT/DEBIAN/control" <<EOF
Package: $PKG
Version: $DEB_VERSION
Architecture: $ARCH
Maintainer: The oci-sif-overlay authors <root@localhost>
Installed-Size: $SIZE
Depends: $DEPENDS
Recommends: prometheus-node-exporter
Section: admin
Priority: optional
Description: crash-safe writable overlays in SingularityCE OCI-SIF images
 Keeps the digest of the ext3 overlay of an OCI-SIF in step with its bytes:
 a journaled reconcile engine and CLI (sifoverlay), a Slurm SPANK plugin with
 Prolog/Epilog hooks (sbatch --oci-sif-overlay=IMAGE), a sweeper timer for jobs
 whose Epilog never ran, and a Prometheus exporter.
 .
 Source id $ID; SPANK plugin built against Slurm ${SLURM_VERSION:-unknown}.
EOF
echo "/etc/default/sifoverlay-exporter" >"$ROOT/DEBIAN/conffiles"
for script in postinst prerm postrm; do
	install -m 0755 "packaging/debian/$script" "$ROOT/DEBIAN/$script"
done
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum | sed 's|  \./|  |') \
	>"$ROOT/DEBIAN/md5sums"

mkdir -p "$OUTDIR"
OUT=$OUTDIR/${PKG}_${DEB_VERSION}_$ARCH.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT.tmp" >/dev/null
mv -f "$OUT.tmp" "$OUT"
log "built $OUT (source id $ID)"
echo "$OUT"
