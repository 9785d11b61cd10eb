#!/usr/bin/env bash
# Generate the Python gRPC stubs from proto/ into services/api/ (committed; CI checks they are current).
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default services/api)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
out="${1:-services/api}"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/kvstash/v1/kvstash.proto
# Generated code imports `kvstash.v1...` as a top-level package; make it relative to services.api.
sed -i 's/^from kvstash\.v1 import/from services.api.kvstash.v1 import/' "$out/kvstash/v1/kvstash_pb2_grpc.py"
touch "$out/__init__.py" "$out/kvstash/__init__.py" "$out/kvstash/v1/__init__.py"
