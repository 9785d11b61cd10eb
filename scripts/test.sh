#!/usr/bin/env bash
# Command 2 of 2: set up (if needed), lint (ruff, import contracts) and run the whole test suite (unit + end
# to end with a real redis-server, real Ray, real gRPC and the real SmolLM2). `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY="${KVSTASH_VENV:-.venv}/bin/python"
echo "[test] generated stubs are current"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
PYTHON="$PY" scripts/gen_proto.sh "$tmp/api"
diff -r -x __pycache__ "$tmp/api" services/api || { echo "[test] FATAL: services/api is stale: run scripts/gen_proto.sh" >&2; exit 1; }
BIN="$(dirname "$PY")"
echo "[test] ruff check (lint rules in pyproject.toml)"
"$BIN/ruff" check kvstore services tests || { echo "[test] FATAL: ruff check failed" >&2; exit 1; }
echo "[test] lint-imports (import contracts in pyproject.toml)"
PYTHONPATH="$PWD" "$BIN/lint-imports" --no-cache --no-logo \
  || { echo "[test] FATAL: an import contract is broken (README.md, Layer map)" >&2; exit 1; }
exec "$PY" -m pytest -p no:cacheprovider -ra "$@"
