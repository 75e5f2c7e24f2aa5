"""``doctor --pool-device DEV``: what ``serve --pool-device DEV`` would do with it."""

from __future__ import annotations

from pathlib import Path

from csi_driver.doctor.check import FAIL, OK, Check
from csi_driver.errors import CommandFailed
from csi_driver.pool import PoolError, assess, describe


def check_pool(device: str, state_dir: Path) -> Check:
    try:
        kind, found = assess(device, state_dir)
    except (PoolError, CommandFailed) as e:
        return Check("pool_device", FAIL, str(e), "name a block device that nothing else has mounted")
    if kind == "mounted":
        return Check("pool_device", OK, f"{device} is mounted at {state_dir}: snapshots in use are clones")
    if kind == "empty":
        return Check("pool_device", OK, f"{device} is empty: serve formats it xfs (reflink) and mounts it")
    if kind == "ours":
        return Check("pool_device", OK, f"{device} holds an overlay-csi pool: serve mounts it at {state_dir}")
    return Check(
        "pool_device",
        FAIL,
        f"{device} holds {describe(found)}: serve refuses to format it",
        "give an empty device, or add --pool-device-wipe to serve (destroys what it holds)",
    )
