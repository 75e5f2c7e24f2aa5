"""Keyed locks: one lock per volume/layer id, created on demand, never global."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, users]

    def _get(self, key: str) -> threading.Lock:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
            return entry[0]

    def _put(self, key: str) -> None:
        with self._guard:
            entry = self._locks[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    @contextmanager
    def hold(self, key: str, acquire: Callable[[threading.Lock], None] | None = None) -> Iterator[None]:
        """Wait for the key's lock (``acquire(lock)`` waits instead, and may give up by raising)."""
        lock = self._get(key)
        try:
            if acquire is None:
                lock.acquire()
            else:
                acquire(lock)
            try:
                yield
            finally:
                lock.release()
        finally:
            self._put(key)

    @contextmanager
    def try_hold(self, *keys: str) -> Iterator[bool]:
        """Take every key's lock without waiting; yield False if any is busy."""
        taken: list[tuple[str, threading.Lock]] = []
        ok = True
        try:
            for key in sorted(set(keys)):
                lock = self._get(key)
                if lock.acquire(blocking=False):
                    taken.append((key, lock))
                else:
                    self._put(key)
                    ok = False
                    break
            yield ok
        finally:
            for key, lock in reversed(taken):
                lock.release()
                self._put(key)

    def busy(self) -> list[str]:
        with self._guard:
            return [k for k, (lock, _) in self._locks.items() if lock.locked()]
