"""Fixtures for the kubelet-shaped tests (fixtures only; the harness is kubelet_sim.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubelet_sim import NodeEnv

from driver_harness import MOUNT_SKIP, cleanup

try:  # the shared state-invariant checker, when the harness has it
    from driver_harness import invariant_problems
except ImportError:  # pragma: no cover
    invariant_problems = None


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., NodeEnv]]:
    """Build NodeEnvs (each in its own temp root) with driver options; at the end each
    driver's state is checked for consistency (store, disk, mounts, answers), then all are
    stopped and checked for leaked mounts and loop devices."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    envs: list[tuple[NodeEnv, Path]] = []

    def make(name: str = "node", **driver_opts) -> NodeEnv:
        root = tmp_path / name
        root.mkdir()
        env = NodeEnv(root, **driver_opts)
        envs.append((env, root))
        return env

    try:
        yield make
    finally:
        leaks, problems = [], []
        for env, root in envs:
            try:
                if invariant_problems is not None:
                    problems += invariant_problems(env.driver.state, env.client, root=root)
            except Exception as e:  # a dead driver or a broken store is a problem too
                problems.append(f"{root.name}: invariant check failed: {e!r}")
            finally:
                env.stop()
                mounts, loops = cleanup(root)
                leaks += mounts + loops
    assert not problems, "driver state inconsistent after the test:\n  " + "\n  ".join(problems)
    assert not leaks, f"test leaked mounts or loop devices: {leaks}"


@pytest.fixture
def node(make_node: Callable[..., NodeEnv]) -> NodeEnv:
    return make_node()
