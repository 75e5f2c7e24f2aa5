#!/usr/bin/env bash
# Set up and run the whole test suite: lint, then pytest (mount tests need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
[ -d .ci/bin ] && export PATH="$PWD/.ci/bin:$PATH"
.venv/bin/ruff check csi_driver tests bench
.venv/bin/python -m pytest "$@"
