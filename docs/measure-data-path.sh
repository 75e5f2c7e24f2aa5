#!/bin/bash
# The capacity, host-disk and RPC-duration figures of docs/comparison.md: an
# overlay-csi volume against a plain directory on the same disk (what
# local-path-provisioner gives a pod). Throughput: python -m bench.data_path.
# From the repository root, as root (the mounts vanish with the namespace):
#   PY=.venv/bin/python unshare -m --propagation private bash docs/measure-data-path.sh
set -e
W=$(mktemp -d "${MEASURE_DIR:-/var/tmp}/ocsi-measure.XXXX")
PY=${PY:-python3}
overlay_csi() { $PY -m csi_driver "$@"; }
overlay_csi serve --endpoint unix://$W/csi.sock --state-dir $W/state --node-id m --log-format json > $W/log 2>&1 &
PID=$!
for i in $(seq 100); do [ -S $W/csi.sock ] && break; sleep 0.1; done
export CSI_ENDPOINT=unix://$W/csi.sock
id_of() { $PY -c 'import json,sys;print(json.load(sys.stdin)["volume_id"])'; }
files() { $PY -c 'import os,sys,time
d=sys.argv[1]; os.makedirs(d); t=time.perf_counter()
for i in range(20000):
    with open(f"{d}/{i}","wb") as f: f.write(b"x"*4096)
os.sync(); print(f"{time.perf_counter()-t:.2f} s")' "$1"; }

VID=$(overlay_csi volume create m --size 2Gi --json | id_of)
overlay_csi node stage $VID $W/stg >/dev/null; overlay_csi node publish $VID $W/stg $W/tgt >/dev/null
mkdir -p $W/plain
# the same data on both sides (the throughput figures come from bench/data_path.py)
dd if=/dev/zero of=$W/tgt/f bs=1M count=1024 conv=fsync status=none
dd if=/dev/zero of=$W/plain/f bs=1M count=1024 conv=fsync status=none
files $W/tgt/many >/dev/null; files $W/plain/many >/dev/null
echo "== host disk: volume image (apparent | allocated) | plain dir"
du -sh --apparent-size $W/state/layers/*/image; du -sh $W/state/layers/*/image; du -sh $W/plain
echo "== fill the 2 GiB volume past its size:  volume | plain dir"
dd if=/dev/zero of=$W/tgt/over bs=1M count=3072 conv=fsync 2>&1 | grep -E "No space|copied" || true
dd if=/dev/zero of=$W/plain/over bs=1M count=3072 conv=fsync 2>&1 | tail -1
rm -f $W/tgt/over $W/plain/over
overlay_csi node unpublish $VID $W/tgt >/dev/null; overlay_csi node unstage $VID $W/stg > /dev/null
overlay_csi volume delete $VID > /dev/null
echo "== rm -rf of the same data (local-path's teardown)"
/usr/bin/time -f "%e s" rm -rf $W/plain
V2=$(overlay_csi volume create big --size 10Gi --json | id_of)
echo "== host disk for a fresh 10 GiB volume"; du -sh $W/state/layers/*/image
overlay_csi volume delete $V2 > /dev/null
kill $PID; wait $PID || true
echo "== server-side RPC durations (duration_ms from the JSON log)"
$PY -c 'import json,sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("rpc") in ("CreateVolume","NodeStageVolume","NodePublishVolume","NodeUnpublishVolume","NodeUnstageVolume","DeleteVolume"):
        print("%-22s %8.1f ms" % (r["rpc"], r["duration_ms"]))' $W/log
rm -rf $W
