"""Pod start does no work per volume staged on the node: the share-out of the free
space (layerstore/overlay/ration.py) looks at every writable upper a few times a
second, holding its lock while it reads them all, and a stage that took that lock
to learn "not limited" waited for the look (11.5 ms per pod start at 250 staged,
9.8 ms at 25)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from csi_driver.layerstore.overlay import ration
from csi_driver.layerstore.overlay.layout import Layout
from driver_harness import needs_mounts

MiB = 1 << 20


LOOK_THREAD = "storage-ration"  # the server's background look (server.py)


def not_the_look() -> bool:
    return threading.current_thread().name != LOOK_THREAD


class CountingLock:
    """A lock that counts its acquisitions by any thread but the background look's."""

    def __init__(self, lock) -> None:
        self.lock = lock
        self.taken = 0

    def __enter__(self):
        self.taken += not_the_look()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


@needs_mounts
def test_stage_and_publish_read_no_upper_and_wait_for_no_look(driver, monkeypatch):
    """While the volumes are not limited, a stage and a publish take the share-out's lock
    not once and read no upper, however many volumes are staged."""
    c = driver.client
    used = {}
    for name in ("busy-0", "busy-1", "busy-2"):  # a node with volumes in use
        used[name] = c.create_volume(name, 64 * MiB).volume_id
        c.stage(used[name], driver.paths(name)[0])
        c.publish(used[name], *driver.paths(name))
    rationing = driver.engine.backend.rationing
    assert not rationing.limited
    lock = CountingLock(rationing._lock)
    monkeypatch.setattr(rationing, "_lock", lock)
    reads: list[str] = []
    real = ration.read_upper
    monkeypatch.setattr(ration, "read_upper", lambda *a: (not_the_look() and reads.append(a[1])) or real(*a))
    used["pod"] = c.create_volume("pod", 64 * MiB).volume_id
    lock.taken = 0
    staging, target = driver.paths("pod")
    c.stage(used["pod"], staging)
    c.publish(used["pod"], staging, target)
    assert (lock.taken, reads) == (0, [])
    for name, vid in used.items():
        staging, target = driver.paths(name)
        c.unpublish(vid, target)
        c.unstage(vid, staging)


def reading(layer_id: str, free_blocks: int) -> ration._Reading:
    return ration._Reading(layer_id, f"/dev/{layer_id}", 4096, 16384, free_blocks, 0, 0, 100)


def test_an_upper_mounted_during_a_look_is_admitted_at_once_and_limited_by_it(tmp_path: Path, monkeypatch):
    """Its admit does not wait for the look (which reads every upper, holding the lock),
    and the look that limits the uppers limits it too, though it did not read it."""
    writable = {"a": "ext4"}
    in_look, go_on = threading.Event(), threading.Event()
    limits: dict[str, int] = {}

    def read(_layout: Layout, layer_id: str, _device: str) -> ration._Reading:
        if layer_id == "a" and not in_look.is_set():
            in_look.set()
            assert go_on.wait(10)
        return reading(layer_id, 16000)

    monkeypatch.setattr(ration, "read_upper", read)
    monkeypatch.setattr(ration.host.fsreserve, "set_reserved_clusters", limits.__setitem__)
    r = ration.Rationing(Layout(tmp_path), lambda: dict(writable), lambda layer_id: f"/dev/{layer_id}")
    look = run(lambda: r.apply(room=8 * MiB))  # far less than the uppers could take: limited
    assert in_look.wait(10)
    writable["b"] = "ext4"  # mounted during the look
    admit = run(lambda: r.admit("b"))
    admit.join(5)
    alive = admit.is_alive()
    go_on.set()
    look.join(10)
    admit.join(10)
    assert not alive, "admit waited for the look in progress"
    assert r.limited and set(limits) == {"/dev/a", "/dev/b"}, limits


def run(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t
