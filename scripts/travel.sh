#!/usr/bin/env bash
# A snapshot moving between two nodes through an OCI registry, on one machine
# (needs root): a registry (Debian's docker-registry) and two drivers with their
# own state dirs and sockets stand for two nodes. Everything runs in a private
# mount namespace under a temp dir, and goes when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${OVERLAY_CSI_TRAVEL_NS:-}" != 1 ]; then
    bash scripts/setup.sh
    if [ ! -x /usr/bin/docker-registry ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
    fi
    OVERLAY_CSI_TRAVEL_NS=1 exec unshare --mount --propagation private bash "$0" "$@"
fi
PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d /var/tmp/overlay-csi-travel.XXXXXX)
pids=()
finish() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap finish EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
registry=127.0.0.1:$port
cat >"$work/registry.yml" <<YAML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: "$registry"}
log: {level: error}
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & pids+=($!)
for node in a b; do
    mkdir -p "$work/$node"
    overlay-csi serve --endpoint "unix://$work/$node/csi.sock" --state-dir "$work/$node/state" \
        --node-id "node-$node" --insecure-registry "$registry" --log-level warning & pids+=($!)
done
for _ in $(seq 100); do
    [ -S "$work/a/csi.sock" ] && [ -S "$work/b/csi.sock" ] && break
    sleep 0.1
done
A=(--endpoint "unix://$work/a/csi.sock")
B=(--endpoint "unix://$work/b/csi.sock")
show() { echo "\$ $*" | sed "s|$work|\$WORK|g"; }
id_of() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("volume_id") or d["snapshot_id"])'; }

echo "== node A: a volume with data, and a snapshot exported to $registry/demo/db"
vol=$(overlay-csi volume create db --size 64Mi --json "${A[@]}" | id_of)
mkdir -p "$work/a/mnt"
overlay-csi node stage "$vol" "$work/a/mnt" "${A[@]}" >/dev/null
echo "written on node A at $(date -u +%H:%M:%S)" >"$work/a/mnt/hello.txt"
overlay-csi node unstage "$vol" "$work/a/mnt" "${A[@]}" >/dev/null
show overlay-csi snapshot create db-snap "$vol" --param repository="$registry/demo/db" "${A[@]}"
snap=$(overlay-csi snapshot create db-snap "$vol" --param repository="$registry/demo/db" --json "${A[@]}" | id_of)
echo "snapshot id: $snap"

echo "== node B: a volume restored from that id (B pulls the layers it lacks)"
show overlay-csi volume create db-copy --size 64Mi --from-snapshot "$snap" "${B[@]}"
copy=$(overlay-csi volume create db-copy --size 64Mi --from-snapshot "$snap" --json "${B[@]}" | id_of)
mkdir -p "$work/b/mnt"
overlay-csi node stage "$copy" "$work/b/mnt" "${B[@]}" >/dev/null
echo "node B reads: $(cat "$work/b/mnt/hello.txt")"
overlay-csi node unstage "$copy" "$work/b/mnt" "${B[@]}" >/dev/null

overlay-csi volume delete "$copy" "${B[@]}" >/dev/null
overlay-csi snapshot delete "$snap" "${A[@]}" >/dev/null
overlay-csi volume delete "$vol" "${A[@]}" >/dev/null
echo "== cleaned up: volumes and the snapshot deleted (its manifest too, from the registry)"
