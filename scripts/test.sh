#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what is missing (scripts/setup.sh), starts the local Slurm cluster, runs pytest,
# and stops everything it started. Tests start their own registry, Prometheus and kmock API
# server on loopback and stop them. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

started_cluster=0
cleanup() {
  if ((started_cluster)); then slurm_plugin/dev-cluster down >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
if [[ -x slurm_plugin/dev-cluster ]]; then
  slurm_plugin/dev-cluster up && started_cluster=1 || { echo "test.sh: dev-cluster up failed" >&2; exit 1; }
fi

export FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-100000}
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
if ((rc == 5)); then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
