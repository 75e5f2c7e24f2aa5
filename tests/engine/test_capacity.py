"""Admission arithmetic, with a backend whose disk the test sets: no mounts."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from csi_driver.cli.args import parse_share
from csi_driver.engine.capacity import Capacity, CapacityPolicy, Share
from csi_driver.errors import OutOfRange, ResourceExhausted
from csi_driver.store import Layer, Store

MiB = 1 << 20


class Disk:
    """The backend calls Capacity makes: a disk of ``size`` with ``free`` bytes."""

    def __init__(self, size: int, free: int) -> None:
        self.size, self.free = size, free
        self.allocated: dict[str, int] = {}
        self.settles = 0

    def fs_size(self) -> int:
        return self.size

    def free_bytes(self) -> int:
        return self.free

    def usages(self, layer_ids: list[str]) -> dict[str, int]:
        return {x: self.allocated.get(x, 0) for x in layer_ids}

    def size_for(self, capacity: int, fs_type: str) -> int:
        return capacity + capacity // 10  # padding, to see GetCapacity invert it

    def settle(self) -> None:
        self.settles += 1


def layer(store: Store, disk: Disk, lid: str, *, active: bool, image: int, allocated: int) -> None:
    with store.tx() as tx:
        tx.add_layer(Layer(lid, None, lid[:8], None, int(active), "ext4", 0, image, 0, 0.0))
    disk.allocated[lid] = allocated


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def test_shares_parse_as_percentages_or_binary_sizes():
    assert parse_share("10%") == Share(percent=10.0)
    assert parse_share(" 2.5% ") == Share(percent=2.5)
    assert parse_share("512Mi") == parse_share("512M") == Share(fixed=512 * MiB)
    assert parse_share("0") == Share()
    assert Share(percent=10).of(1000 * MiB) == 100 * MiB
    for bad in ("", "ten", "150%", "-1%", "1e3", "5 %%", "²"):
        with pytest.raises(ValueError):
            parse_share(bad)
    with pytest.raises(ValueError):
        CapacityPolicy(ratio=0.5)


def test_at_ratio_one_the_free_space_covers_what_every_volume_may_still_write(store):
    disk = Disk(size=1000 * MiB, free=600 * MiB)
    cap = Capacity(store, disk, CapacityPolicy(1.0, Share(fixed=10 * MiB), Share(fixed=50 * MiB)))
    layer(store, disk, "a" * 32, active=True, image=300 * MiB, allocated=100 * MiB)  # may write 200 more
    layer(store, disk, "b" * 32, active=False, image=300 * MiB, allocated=80 * MiB)  # frozen: no more
    f = cap.figures()
    assert f.promised == 300 * MiB + 80 * MiB and f.held == 180 * MiB
    assert f.available == 600 * MiB - 10 * MiB - 200 * MiB
    # GetCapacity answers a capacity whose padded image fits
    largest = cap.largest_volume("ext4")
    assert disk.size_for(largest, "ext4") <= f.available < disk.size_for(largest + MiB, "ext4")
    with pytest.raises(ResourceExhausted, match=r"needs 391 MiB but the node can promise only 390 MiB"):
        with cap.admit(391 * MiB, "volume 'x'"):
            pass
    with cap.admit(390 * MiB, "volume 'x'"):
        assert cap.figures().available == 0, "admitted, not yet recorded, still counts"
        with pytest.raises(OutOfRange, match="growth"):
            with cap.admit(1, "growth of volume v", OutOfRange):
                pass
    assert cap.figures().available == 390 * MiB, "released when the caller is done"


def test_a_ratio_promises_that_many_times_what_the_node_holds(store):
    disk = Disk(size=1000 * MiB, free=600 * MiB)
    cap = Capacity(store, disk, CapacityPolicy(3.0, Share(), Share()))
    layer(store, disk, "a" * 32, active=True, image=900 * MiB, allocated=100 * MiB)
    assert cap.figures().available == 3 * (600 + 100) * MiB - 900 * MiB


def test_below_the_watermark_nothing_is_promised_and_the_change_is_logged(store, caplog):
    caplog.set_level(logging.INFO, logger="csi_driver.engine.capacity")
    disk = Disk(size=1000 * MiB, free=600 * MiB)
    cap = Capacity(store, disk, CapacityPolicy(4.0, Share(), Share(percent=10)))
    assert cap.low() == "" and cap.figures().available > 0
    disk.free = 99 * MiB
    assert cap.low().startswith("node storage is low: 99 MiB free of 1000 MiB")
    assert cap.figures().available == 0
    with pytest.raises(ResourceExhausted, match="node storage is low"):
        with cap.admit(MiB, "snapshot 's'"):
            pass
    with cap.admit(0, "growth to the size it has"):  # nothing new: never refused
        pass
    assert cap.watch() is True
    deadline = time.monotonic() + 10  # the watch's own, or the one entering low started
    while disk.settles == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disk.settles >= 1, "low storage checkpoints the volumes' journals"
    disk.free = 500 * MiB
    assert cap.watch() is False
    logged = [r.getMessage() for r in caplog.records if r.name == "csi_driver.engine.capacity"]
    assert [m.split(":")[0] for m in logged] == ["node storage is low", "node storage recovered"]


def test_at_ratio_one_low_space_matters_only_when_promises_are_not_covered(store):
    disk = Disk(size=1000 * MiB, free=90 * MiB)  # below the 10% watermark
    cap = Capacity(store, disk, CapacityPolicy(1.0, Share(), Share(percent=10)))
    layer(store, disk, "a" * 32, active=True, image=100 * MiB, allocated=20 * MiB)  # may write 80 more
    assert cap.low() == "", "the volumes' promises fit in what is free: nothing at risk"
    disk.free = 70 * MiB  # something else took space: a volume may now fail before it is full
    assert cap.low().startswith("node storage is low")


def test_concurrent_admissions_never_promise_the_same_bytes_twice(store):
    disk = Disk(size=1000 * MiB, free=500 * MiB)
    cap = Capacity(store, disk, CapacityPolicy(1.0, Share(), Share()))
    admitted, start = [], threading.Barrier(8)

    def ask() -> None:
        start.wait()
        try:
            with cap.admit(100 * MiB, "volume"):
                admitted.append(1)
                threading.Event().wait(0.5)  # the others ask meanwhile
        except ResourceExhausted:
            pass

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5


def _sums(f) -> tuple[int, int, int]:
    return f.promised, f.held, f.unwritten


def test_the_figures_follow_every_layer_change_as_a_fresh_look_sees_them(store, tmp_path):
    """The figures are kept from the store's log of changed layers: after adds, a commit, an
    expansion, a collection and a write by another process they are what a new look reads."""
    disk = Disk(size=10_000 * MiB, free=5_000 * MiB)
    cap = Capacity(store, disk, CapacityPolicy(2.0, Share(), Share()))

    def fresh() -> tuple[int, int, int]:
        return _sums(Capacity(store, disk, CapacityPolicy(2.0, Share(), Share())).figures())

    a, b, c = "a" * 32, "b" * 32, "c" * 32
    layer(store, disk, a, active=True, image=300 * MiB, allocated=100 * MiB)
    layer(store, disk, b, active=False, image=200 * MiB, allocated=50 * MiB)
    assert _sums(cap.figures()) == fresh() == (350 * MiB, 150 * MiB, 200 * MiB)
    layer(store, disk, c, active=True, image=400 * MiB, allocated=10 * MiB)
    with store.tx() as tx:
        tx.update_layer(a, active=0)  # committed: its allocation is fixed now
        tx.update_layer(c, image_bytes=800 * MiB)  # expanded
    assert _sums(cap.figures()) == fresh() == (800 * MiB + 150 * MiB, 160 * MiB, 790 * MiB)
    with store.tx() as tx:
        assert {x.id for x in tx.collect_garbage()} == {a, b, c}
    assert _sums(cap.figures()) == fresh() == (0, 0, 0)
    other = Store(tmp_path / "state.db")  # another process's write (the offline layer commands)
    try:
        layer(other, disk, a, active=True, image=64 * MiB, allocated=MiB)
    finally:
        other.close()
    assert _sums(cap.figures()) == fresh() == (64 * MiB, MiB, 63 * MiB)


def sql_steps(store: Store, look) -> int:
    """The SQLite VM instructions ``look()`` runs on this thread's connections (the
    writer's and this thread's reader): rows scanned show as steps, an index lookup does not."""
    with store.read() as r:
        reader = r.c
    with store.tx() as tx:
        writer = tx.c
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    for conn in (reader, writer):
        conn.set_progress_handler(count, 1)
    try:
        look()
    finally:
        for conn in (reader, writer):
            conn.set_progress_handler(None, 1)
    return steps[0]


def test_a_look_costs_the_layers_changed_not_the_layers_there_are(store):
    """Each admission looks at the figures: with 500 layers that look must cost what it does
    with 20 (a CreateVolume at 3,000 volumes as at none)."""
    disk = Disk(size=100_000 * MiB, free=50_000 * MiB)
    cap = Capacity(store, disk, CapacityPolicy(2.0, Share(), Share()), clock=lambda: 0.0)
    n = 0

    def one_more_then_look() -> int:
        nonlocal n
        n += 1
        layer(store, disk, f"{n:08x}" * 4, active=n % 3 != 0, image=MiB, allocated=0)
        return sql_steps(store, cap.figures)

    while n < 20:
        one_more_then_look()
    few = one_more_then_look()
    while n < 500:
        layer(store, disk, f"{n + 1:08x}" * 4, active=n % 3 != 0, image=MiB, allocated=0)
        n += 1
    cap.figures()
    many = one_more_then_look()
    assert many <= few + 10, (few, many)
