"""The invariant checker the crash and concurrency suites rely on must see every
kind of leak it claims to: a checker that passes everything proves nothing."""

from __future__ import annotations

from pathlib import Path

from csi_driver import host
from driver_harness import Driver, invariant_problems, store_dump

MiB = 1 << 20


def test_invariant_checker_sees_each_kind_of_debris(driver: Driver):
    c = driver.client
    state = driver.state
    vol = c.create_volume("v", 16 * MiB).volume_id
    staging, _ = driver.paths("v")
    c.stage(vol, staging)
    assert invariant_problems(state, c, root=driver.root) == []
    upper = store_dump(state)["volumes"][0]["upper"]

    stray_dir = state / "layers" / ("f" * 32)
    stray_dir.mkdir()
    assert any("not a layer the store knows" in p for p in invariant_problems(state))
    stray_dir.rmdir()

    link = state / "l" / "ZZZZZZZZZZ"
    link.symlink_to("../layers/" + "e" * 32 + "/mnt/upper")
    assert any("link the store does not know" in p for p in invariant_problems(state))
    link.unlink()

    (state / "tmp" / "x").mkdir()
    assert any("scratch left" in p for p in invariant_problems(state))
    assert not invariant_problems(state, quiescent=False)
    (state / "tmp" / "x").rmdir()

    dev = host.loop_attach(state / "layers" / upper / "image", readonly=True)
    try:
        assert any("attached but not mounted" in p for p in invariant_problems(state))
    finally:
        host.loop_detach(dev)

    spot = state / "tmp"
    host.bind_mount(driver.root / "kubelet", spot)
    try:
        assert any("stray mount" in p for p in invariant_problems(state))
    finally:
        host.umount(spot)

    elsewhere = driver.root / "kubelet" / "elsewhere"
    elsewhere.mkdir()
    host.bind_mount(staging, elsewhere)
    try:
        assert any("no recorded staging path" in p for p in invariant_problems(state, root=driver.root))
    finally:
        host.umount(elsewhere)

    host.umount(staging)  # the overlay vanished: its layers are held by nobody visible
    assert any("no staged volume uses it" in p for p in invariant_problems(state))
    c.stage(vol, staging)
    assert invariant_problems(state, c, root=driver.root) == []
    c.unstage(vol, staging)
    assert invariant_problems(state, c, root=driver.root) == []
    assert Path(state / "empty").is_dir()
