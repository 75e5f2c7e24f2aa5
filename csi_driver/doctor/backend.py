"""Which layer backend the driver will keep layers with, and what that means: the
plain-directory one enforces no capacity (development clusters only)."""

from __future__ import annotations

from pathlib import Path

from csi_driver.doctor.check import OK, WARN, Check
from csi_driver.engine import backend_record
from csi_driver.layerstore.backends import DEFAULT, kind


def check_backend(state_dir: Path, asked: str = "") -> Check:
    """``asked``: serve's --backend ('' for what the state dir records, or the default)."""
    try:
        recorded = (state_dir / backend_record.FILE).read_text().strip()
    except OSError:
        recorded = ""
    name = asked or recorded or DEFAULT
    about = kind(name).about
    if asked and recorded and asked != recorded:
        return Check(
            "backend",
            WARN,
            f"--backend {asked} ({about}), but state dir {state_dir} records the {recorded} backend: "
            "serve refuses the change while the state dir holds layers",
            f"serve with --backend {recorded}, or use another --state-dir",
        )
    if not kind(name).capabilities().enforces_capacity:
        return Check(
            "backend",
            WARN,
            f"{name} ({about}) ENFORCES NO CAPACITY: a volume may write past its size until the state "
            "dir's file system is full, for every volume and the host",
            "use it on development clusters only; for anything else serve with --backend overlay",
        )
    return Check("backend", OK, f"{name}: {about}")
