#!/usr/bin/env bash
# Set up and run the live demo on embedded defaults (needs root for mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/overlay-csi demo "$@"
