"""The engine's logic without root: the plain-directory backend and a mounter that
makes symlinks. Volumes, snapshots of detached and in-use volumes, restores,
clones, deep chains, deletes and start-up reconciliation, all as an unprivileged
user could run them (CI runs this file as nobody too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_mounter import FakeMounter

from csi_driver.engine.engine import BadConfig, Engine, EngineConfig, VolumeSpec
from csi_driver.engine.reconcile import reconcile
from csi_driver.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_driver.ids import new_id
from csi_driver.layerstore.plaindir import PlainDirBackend

MiB = 1 << 20


def make_engine(state: Path, mounter: FakeMounter, **config) -> Engine:
    cfg = EngineConfig(state_dir=state, node_id="node-1", fs_type="dir", **config)
    return Engine(cfg, backend=PlainDirBackend(state), mounter=mounter)


@pytest.fixture
def mounter() -> FakeMounter:
    return FakeMounter()


@pytest.fixture
def engine(tmp_path: Path, mounter: FakeMounter) -> Iterator[Engine]:
    eng = make_engine(tmp_path / "state", mounter)
    yield eng
    eng.close()


def use(engine: Engine, tmp_path: Path, vid: str, name: str) -> Path:
    """Stage and publish a volume as kubelet would; return the pod's path."""
    staging, target = tmp_path / "staging" / name, tmp_path / "pods" / name
    staging.mkdir(parents=True)
    target.mkdir(parents=True)
    engine.stage(vid, str(staging))
    engine.publish(vid, str(staging), str(target), readonly=False)
    return target


def release(engine: Engine, tmp_path: Path, vid: str, name: str) -> None:
    engine.unpublish(vid, str(tmp_path / "pods" / name))
    engine.unstage(vid, str(tmp_path / "staging" / name))


def test_volume_lifecycle_and_snapshots_of_a_volume_in_use(engine, tmp_path, mounter):
    v = engine.create_volume(VolumeSpec(name="pvc-1", required_bytes=8 * MiB))
    assert engine.create_volume(VolumeSpec(name="pvc-1", required_bytes=8 * MiB)).id == v.id, "idempotent"
    pod = use(engine, tmp_path, v.id, "a")
    (pod / "data").write_text("one")
    (pod / "dir").mkdir()
    (pod / "dir" / "f").write_text("kept")

    snap = engine.create_snapshot("snap-1", v.id)  # in use: a copy, the volume keeps its upper
    (pod / "data").write_text("two")  # after the snapshot: not in it
    assert engine.get_volume(v.id).upper == v.upper

    restored = engine.create_volume(VolumeSpec(name="pvc-2", source_kind="snapshot", source_id=snap.id))
    pod2 = use(engine, tmp_path, restored.id, "b")
    assert (pod2 / "data").read_text() == "one"
    assert (pod2 / "dir" / "f").read_text() == "kept"
    (pod2 / "data").write_text("three")
    assert (pod / "data").read_text() == "two", "volumes never share writes"

    stats = engine.stats(v.id, str(pod))
    assert not stats.abnormal and stats.used_bytes > 0 and stats.total_bytes == v.capacity_bytes

    with pytest.raises(FailedPrecondition):
        engine.delete_volume(v.id)  # still published
    release(engine, tmp_path, v.id, "a")
    release(engine, tmp_path, restored.id, "b")
    assert not mounter.entries and not engine.backend.active_layers()
    engine.delete_volume(restored.id)
    engine.delete_volume(v.id)
    engine.delete_volume(v.id)  # idempotent
    assert engine.backend.walk() != [], "the snapshot keeps its layer"
    engine.delete_snapshot(snap.id)
    assert engine.backend.walk() == [] and engine.layers() == []


def test_detached_snapshots_commit_in_place_and_deep_chains_are_flattened(tmp_path, mounter):
    engine = make_engine(tmp_path / "state", mounter, max_depth=4)
    v = engine.create_volume(VolumeSpec(name="pvc"))
    snaps = []
    for i in range(6):
        pod = use(engine, tmp_path, v.id, f"p{i}")
        (pod / f"f{i}").write_text(str(i))
        release(engine, tmp_path, v.id, f"p{i}")
        before = engine.get_volume(v.id).upper
        snaps.append(engine.create_snapshot(f"s{i}", v.id))
        assert engine.get_snapshot(snaps[-1].id).layer in (
            before,
            engine.chain(engine.get_volume(v.id).upper)[1].id,
        )
        assert len(engine.chain(engine.get_volume(v.id).upper)) <= 4 + 1, "the depth cap holds"
    r = engine.create_volume(VolumeSpec(name="restore", source_kind="snapshot", source_id=snaps[-1].id))
    pod = use(engine, tmp_path, r.id, "r")
    assert sorted(p.name for p in pod.iterdir()) == [f"f{i}" for i in range(6)]
    release(engine, tmp_path, r.id, "r")
    engine.close()


def test_clone_is_a_copy_that_changes_apart(engine, tmp_path):
    v = engine.create_volume(VolumeSpec(name="src"))
    pod = use(engine, tmp_path, v.id, "src")
    (pod / "x").write_text("source")
    clone = engine.create_volume(VolumeSpec(name="clone", source_kind="volume", source_id=v.id))
    (pod / "x").write_text("changed")
    cpod = use(engine, tmp_path, clone.id, "clone")
    assert (cpod / "x").read_text() == "source"
    release(engine, tmp_path, clone.id, "clone")
    release(engine, tmp_path, v.id, "src")


def test_bad_requests_change_nothing(engine, tmp_path):
    with pytest.raises(InvalidArgument, match="plain-dir"):
        engine.create_volume(VolumeSpec(name="raw", access_type="block"))
    with pytest.raises(NotFound):
        engine.create_volume(VolumeSpec(name="r", source_kind="snapshot", source_id="snap-" + new_id()))
    with pytest.raises(NotFound):
        engine.stage("vol-" + new_id(), str(tmp_path))
    assert engine.layers() == [] and engine.backend.walk() == []
    assert not list(engine.state.tmp.iterdir()), "no scratch left behind"


def test_restart_adopts_what_is_staged_and_removes_debris(tmp_path, mounter):
    state = tmp_path / "state"
    engine = make_engine(state, mounter)
    v = engine.create_volume(VolumeSpec(name="kept"))
    pod = use(engine, tmp_path, v.id, "kept")
    (pod / "f").write_text("still here")
    engine.close()  # the driver stops; the (fake) mounts stay, as real ones do

    (state / "dirs" / new_id() / "tree").mkdir(parents=True)  # a crash's debris
    (state / "tmp" / new_id()).mkdir()
    engine = make_engine(state, mounter)
    report = reconcile(engine)
    assert v.id in report.adopted
    assert engine.backend.walk() == [x.id for x in engine.layers()]
    assert not list((state / "tmp").iterdir())
    assert (pod / "f").read_text() == "still here"
    release(engine, tmp_path, v.id, "kept")
    assert not engine.backend.active_layers(), "the adopted hold is released at unstage"
    engine.delete_volume(v.id)
    engine.close()


def test_layers_are_kept_as_configured_and_the_state_dir_remembers_how(tmp_path, mounter):
    """EngineConfig.backend picks it from the table; a request naming no fs type gets the
    backend's default; a state dir holding layers is never opened with another backend
    (refused before that backend touches it), and one naming none gets the recorded one."""
    state = tmp_path / "state"
    engine = Engine(EngineConfig(state_dir=state, node_id="n", backend="plaindir"), mounter=mounter)
    assert engine.backend.capabilities.fs_types == {"dir"} and engine.config.fs_type == "dir"
    v = engine.create_volume(VolumeSpec(name="kept"))
    assert v.fs_type == "dir"
    engine.close()
    with pytest.raises(BadConfig, match="--backend plaindir"):
        Engine(EngineConfig(state_dir=state, node_id="n", backend="overlay"), mounter=mounter)
    assert not (state / "layers").exists(), "the refused backend made nothing in the state dir"
    engine = Engine(EngineConfig(state_dir=state, node_id="n"), mounter=mounter)  # as the CLI opens it
    assert engine.get_volume(v.id).name == "kept" and not engine.backend.capabilities.block
    engine.close()
    with pytest.raises(BadConfig, match="'ext4'"):
        Engine(EngineConfig(state_dir=tmp_path / "other", node_id="n", backend="plaindir", fs_type="ext4"))
