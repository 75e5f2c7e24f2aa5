"""CreateVolume stays flat as volumes accumulate: what it asks of the store must not
grow with the volumes and layers there are (the plain-directory backend, no root)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_mounter import FakeMounter

from csi_driver.engine.engine import Engine, EngineConfig, VolumeSpec
from csi_driver.layerstore.plaindir import PlainDirBackend
from csi_driver.store import Store

MiB = 1 << 20


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    state = tmp_path / "state"
    eng = Engine(
        EngineConfig(state_dir=state, node_id="node-1", fs_type="dir"),
        backend=PlainDirBackend(state),
        mounter=FakeMounter(),
    )
    yield eng
    eng.close()


def store_cost(store: Store, call: Callable[[], object]) -> tuple[int, int]:
    """(SQL statements, SQLite VM instructions) ``call()`` runs on this thread's connections:
    a scan of every row shows as instructions per row, an index lookup as a few."""
    with store.read() as r:
        reader = r.c
    with store.tx() as tx:
        writer = tx.c
    statements, steps = [0], [0]

    def statement(_sql: str) -> None:
        statements[0] += 1

    def step() -> int:
        steps[0] += 1
        return 0

    for conn in (reader, writer):
        conn.set_trace_callback(statement)
        conn.set_progress_handler(step, 1)
    try:
        call()
    finally:
        for conn in (reader, writer):
            conn.set_trace_callback(None)
            conn.set_progress_handler(None, 1)
    return statements[0], steps[0]


def test_create_volume_asks_the_store_as_much_at_300_volumes_as_at_20(engine: Engine):
    def create(name: str) -> tuple[int, int]:
        return store_cost(
            engine.store, lambda: engine.create_volume(VolumeSpec(name=name, required_bytes=MiB))
        )

    for n in range(20):
        create(f"fill-{n}")
    few = [create(f"probe-a{i}") for i in range(3)]
    for n in range(20, 300):
        engine.create_volume(VolumeSpec(name=f"fill-{n}", required_bytes=MiB))
    many = [create(f"probe-b{i}") for i in range(3)]
    assert max(s for s, _ in many) <= min(s for s, _ in few), (few, many)
    assert max(i for _, i in many) <= min(i for _, i in few) * 1.05, (few, many)
