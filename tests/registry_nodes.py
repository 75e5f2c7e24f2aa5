"""The setup the registry tests share: a local registry and two drivers (node A and
node B) that reach it over plain HTTP, and the status a failing RPC ends with."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from driver_harness import Driver, serving
from registry_harness import LocalRegistry


@contextmanager
def registry_nodes(
    tmp_path: Path, start_a: Callable[..., AbstractContextManager[Driver]] = serving
) -> Iterator[tuple[LocalRegistry, Driver, Driver]]:
    """A registry under ``tmp_path/registry`` and drivers in ``tmp_path/a`` (started by
    ``start_a``) and ``tmp_path/b``; all stop on leaving."""
    with ExitStack() as stack:
        reg = stack.enter_context(LocalRegistry(tmp_path / "registry"))
        insecure = frozenset({reg.host})
        roots = [tmp_path / "a", tmp_path / "b"]
        for root in roots:
            root.mkdir()
        a = stack.enter_context(start_a(roots[0], insecure_registries=insecure))
        b = stack.enter_context(serving(roots[1], insecure_registries=insecure))
        yield reg, a, b


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the RpcError ``call(*args, **kwargs)`` raises."""
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()
