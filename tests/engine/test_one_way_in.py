"""The engine's shape: the servicers call only ``Engine``'s own methods, and a layer
is built, recorded, moved into place and exposed one way (``LayerBuilds.adding``)."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_mounter import FakeMounter

import csi_driver.service
from csi_driver.engine.engine import Engine, EngineConfig, VolumeSpec
from csi_driver.layerstore.plaindir import PlainDirBackend

MiB = 1 << 20
SERVICE = Path(csi_driver.service.__file__).parent


def _engine_uses(tree: ast.AST) -> Iterator[tuple[int, str, bool]]:
    """(line, name, whether its value is used further) of every ``<...>.engine.<name>``."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        named_engine = (isinstance(base, ast.Attribute) and base.attr == "engine") or (
            isinstance(base, ast.Name) and base.id == "engine"
        )
        if named_engine:
            reached_past = isinstance(parents.get(node), ast.Attribute)  # engine.part.member
            yield node.lineno, node.attr, reached_past


def test_the_servicers_call_only_engines_own_methods():
    """Not its components nor its config: Engine is the one way in (its calls are
    methods and properties of its class, none an alias bound per instance)."""
    own = {name for name, _ in inspect.getmembers(Engine) if not name.startswith("_")}
    past = []
    for path in sorted(SERVICE.glob("*.py")):
        for line, name, reached_past in _engine_uses(ast.parse(path.read_text())):
            if name not in own or reached_past:
                past.append(f"{path.name}:{line} engine.{name}")
    assert not past, past


def test_the_servicers_import_of_the_engine_only_its_front():
    """engine/engine.py is the engine's one module the servicers know (its Engine, and
    the few plain helpers it exports), never a component's module."""
    imported = []
    for path in sorted(SERVICE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("csi_driver.engine"):
                if node.module != "csi_driver.engine.engine":
                    imported.append(f"{path.name}:{node.lineno} {node.module}")
    assert not imported, imported


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    cfg = EngineConfig(state_dir=tmp_path / "state", node_id="node-1", fs_type="dir")
    eng = Engine(cfg, backend=PlainDirBackend(tmp_path / "state"), mounter=FakeMounter())
    yield eng
    eng.close()


@pytest.mark.parametrize("step", ["create.renamed", "snapshot.committed"])
def test_a_layer_moved_into_place_whose_transaction_fails_leaves_nothing(engine, step):
    """A failure after a build was moved into place, before its rows commit, removes
    what was moved (else it stays on disk, known to no row, until a restart)."""
    v = engine.create_volume(VolumeSpec(name="source", required_bytes=8 * MiB))
    before = sorted(engine.backend.walk())

    def fail(at: str) -> None:
        if at == step:
            raise OSError(28, "No space left on device")

    engine.steps.hook = fail
    with pytest.raises(OSError):
        if step == "create.renamed":
            engine.create_volume(VolumeSpec(name="other", required_bytes=8 * MiB))
        else:
            engine.create_snapshot("snap", v.id)
    engine.steps.hook = lambda at: None
    assert sorted(engine.backend.walk()) == before
    assert sorted(x.id for x in engine.layers()) == before
    assert engine.get_volume(v.id).upper == v.upper
