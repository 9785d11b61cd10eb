#!/usr/bin/env bash
# Set up everything kvstash needs on a fresh Debian machine: redis-server (apt), a Python 3.11 venv
# with the pinned packages (uv), the generated gRPC stubs check, and the default model.
# Fails loudly (set -e) when anything is missing; never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVSTASH_VENV:-.venv}"

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v promtool >/dev/null || need_apt+=(prometheus)  # promtool and a real server, for tests/deploy
command -v openssl >/dev/null || need_apt+=(openssl)        # certificates for the TLS test
command -v python3.11 >/dev/null || command -v python3 >/dev/null || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v redis-server >/dev/null || { echo "[setup] FATAL: redis-server is not installed" >&2; exit 1; }
command -v promtool >/dev/null || { echo "[setup] FATAL: promtool (Debian package prometheus) is not installed" >&2; exit 1; }

if ! command -v uv >/dev/null; then
  echo "[setup] pip install uv"
  python3 -m pip install -q uv
fi
PYBIN="$(command -v python3.11 || command -v python3)"
[ -x "$VENV/bin/python" ] || uv venv -q --seed -p "$PYBIN" "$VENV"
# torch==2.13.0 is pinned; /opt/wheels holds its CPU build on our machines (a plain PyPI resolve would
# fetch a multi-GB CUDA build).
FIND_LINKS=(); [ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
uv pip install -q -p "$VENV/bin/python" "${FIND_LINKS[@]}" -e '.[dev]'
"$VENV/bin/python" -c "import torch, transformers, ray, grpc, redis, zstandard, prometheus_client, numba, xxhash" \
  || { echo "[setup] FATAL: the Python environment is incomplete" >&2; exit 1; }

echo "[setup] helm (for the chart's offline validation)"
scripts/install_helm.sh

echo "[setup] model pull (cached after the first run)"
"$VENV/bin/kvstash" --log-level WARNING model pull
echo "[setup] done"
