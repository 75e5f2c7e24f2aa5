#!/usr/bin/env bash
# Install what overlay-csi needs on a Debian/Ubuntu host: the host tools the node
# plugin calls, and a virtualenv (.venv) with the package. `--test` adds the test
# tools (pytest, ruff, helm for the chart tests, fio for the data-path bench,
# podman and debootstrap for the image test, docker-registry for the registry
# tests). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

need=()
for pair in mount:mount losetup:mount fsfreeze:util-linux mkfs.ext4:e2fsprogs resize2fs:e2fsprogs \
            e2fsck:e2fsprogs tune2fs:e2fsprogs mkfs.xfs:xfsprogs xfs_growfs:xfsprogs blockdev:util-linux \
            unshare:util-linux findmnt:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "$want_test" = 1 ]; then
    command -v npm >/dev/null 2>&1 || need+=(npm)
    command -v fio >/dev/null 2>&1 || need+=(fio)  # bench/data_path.py and its smoke test
    # tests/image: build the image with podman on a base made by debootstrap
    command -v podman >/dev/null 2>&1 || need+=(podman)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    # tests/test_registry.py: a real OCI registry (distribution) on 127.0.0.1
    [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then echo "run as root to install: ${need[*]}" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "overlay-csi needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_quiet() {  # pip's and setuptools' chatter only when something fails
    local log; log=$(mktemp)
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; return 1
    fi
    rm -f "$log"
}
pip_quiet --upgrade pip
if [ "$want_test" = 1 ]; then
    pip_quiet -e '.[test,metrics]'
    bash .ci/install-helm.sh
else
    pip_quiet -e '.[metrics]'
fi
