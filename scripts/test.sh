#!/usr/bin/env bash
# Command 2 of 2: set up (if needed) and run the whole test suite (unit + end to end with a real
# redis-server, real Ray, real gRPC and the real SmolLM2). `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY="${KVSTASH_VENV:-.venv}/bin/python"
echo "[test] generated stubs are current"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
PYTHON="$PY" scripts/gen_proto.sh "$tmp/api"
diff -r -x __pycache__ "$tmp/api" services/api || { echo "[test] FATAL: services/api is stale: run scripts/gen_proto.sh" >&2; exit 1; }
exec "$PY" -m pytest -p no:cacheprovider -ra "$@"
