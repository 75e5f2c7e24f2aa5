"""Regenerate the Python stubs from ``proto/csi.proto``.

Run ``python -m csi_driver.proto.generate`` after editing the proto; the test
suite regenerates into a temp dir and fails if the committed stubs drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto" / "csi.proto"
STUB_NAMES = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Compile the proto so that stubs land in ``out_root/csi_driver/proto``."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{include}",
        f"-Icsi_driver/proto={PROTO.parent}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "csi_driver/proto/csi.proto",
    ]
    (out_root / "csi_driver" / "proto").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return [out_root / "csi_driver" / "proto" / n for n in STUB_NAMES]


if __name__ == "__main__":
    generate(REPO)
    sys.exit(0)
