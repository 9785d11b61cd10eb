#!/usr/bin/env bash
# Command 1 of 2: set up (if needed) and run the whole service locally: a redis-server it spawns,
# local Ray, the worker, the gRPC gateway and /metrics, on the default model. Extra args go to `kvstash up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${KVSTASH_VENV:-.venv}/bin/kvstash" up "$@"
