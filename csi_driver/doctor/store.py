"""The driver's store in the state dir: readable and intact, what it holds,
thin provisioning against free space, and whether a driver is serving it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from csi_driver.doctor.check import FAIL, OK, WARN, Check, fmt_gib
from csi_driver.statedir import StateDir
from csi_driver.store import Unreadable, summarize


def check_store(state_dir: Path) -> list[Check]:
    db = state_dir / "state.db"
    if not db.exists():
        return [Check("store", OK, "no store yet (a new node)")]
    out = []
    try:
        summary = summarize(db)
    except Unreadable as e:
        return [
            Check(
                "store",
                FAIL,
                f"{db} cannot be read: {e}",
                "restore the state dir from a backup (docs/operations.md); keep the broken copy for analysis",
            )
        ]
    if summary.integrity != "ok":
        out.append(
            Check(
                "store",
                FAIL,
                f"{db} fails its integrity check: {summary.integrity}",
                "stop the driver and restore the state dir from a backup (docs/operations.md)",
            )
        )
    else:
        out.append(
            Check(
                "store",
                OK,
                f"schema {summary.schema_version}: {summary.volumes} volumes, {summary.snapshots} snapshots, "
                f"{summary.layers} layers",
            )
        )
    st = os.statvfs(state_dir)
    free = st.f_bavail * st.f_frsize
    allocated = sum(p.stat().st_blocks * 512 for p in (state_dir / "layers").glob("*/image") if p.is_file())
    provisioned = summary.provisioned_bytes
    if provisioned > free + allocated:
        out.append(
            Check(
                "thin_provisioning",
                WARN,
                f"{fmt_gib(provisioned)} provisioned, {fmt_gib(allocated)} allocated, {fmt_gib(free)} free: "
                "if volumes fill up, the backing disk runs out first",
                "add space, or keep --overprovision-ratio at 1.0 (new volumes then wait for room); "
                "watch overlay_csi_storage_low (docs/operations.md, capacity)",
            )
        )
    else:
        ratio = f"{provisioned / allocated:.1f}x" if allocated else "-"
        out.append(
            Check(
                "thin_provisioning",
                OK,
                f"{fmt_gib(provisioned)} provisioned, {fmt_gib(allocated)} allocated (ratio {ratio}); "
                f"{fmt_gib(free)} free covers it",
            )
        )
    lock = StateDir(state_dir).lockfile
    if lock.exists():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            out.append(Check("driver", OK, "no driver is serving this state dir now"))
        except BlockingIOError:
            pid = lock.read_text().strip() or "?"
            out.append(Check("driver", OK, f"a driver (pid {pid}) is serving this state dir"))
        finally:
            os.close(fd)
    return out
