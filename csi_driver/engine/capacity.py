"""Thin-provisioning admission: what the node may still promise, and whether its
disk is running low.

A volume's upper is a sparse image as large as the volume: the volume may fill
it. So the node has promised, per layer, a writable upper's whole image and a
committed layer's allocation (it never grows). It holds the free space of the
state dir's file system plus what its layers already occupy, less a reserve the
driver never promises (the host file system's own metadata, the store). It may
promise ``ratio`` times what it holds. At ratio 1 this is exactly: the free space
less the reserve covers what every writable upper may still allocate.

Below the low-space watermark the node makes no new promise at any ratio, every
thin volume's condition says why, and the backend checkpoints the volumes'
journals (``settle``) each time the watch looks, so what they have committed is in
place before the disk can fill.

And at any ratio the writable volumes together may never allocate more than the
disk has free less a slop (``ration``, a few times a second, as ZFS keeps its slop
space): what a volume writes beyond its share fails in that volume with ENOSPC, so
the disk never fills from the volumes and no neighbour loses a write it cannot
take back. The slop is what the driver's own writes, the host file system and the
blocks in flight between two looks may still need.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from csi_driver.errors import DriverError, InvalidArgument, OutOfRange, ResourceExhausted
from csi_driver.layerstore.backend import LayerBackend, Ration
from csi_driver.store import Store, Volume

log = logging.getLogger(__name__)

MiB = 1 << 20
#: how long the writable uppers' allocations are reused (reading them is a stat
#: per volume: 10 ms at 3,000); their growth since then only makes the answer
#: more cautious, as the free space is read fresh
HELD_TTL = 2.0
#: more layers changed since the last look than this: all are read again (one query)
MAX_CHANGED = 500
#: the slop: 1/32 of the disk, as ZFS holds back, within these bounds
SLOP_SHARE = 1 / 32
SLOP_MIN, SLOP_MAX = 16 * MiB, 1 << 30


def slop(fs_bytes: int) -> int:
    """What the volumes may never allocate of a disk of ``fs_bytes``."""
    return min(SLOP_MAX, max(SLOP_MIN, int(fs_bytes * SLOP_SHARE)))


class Space(Protocol):
    """Where layers are kept, as admission sees it: the backend's file system, or
    one bounded by another (a pool file also takes its host's free space)."""

    def free_bytes(self) -> int:
        """Bytes volumes may still be given."""

    def fs_size(self) -> int:
        """Size of the file system the shares (reserve, watermark, slop) are taken of."""


@dataclass(frozen=True)
class Share:
    """A part of the state dir's file system: a percentage of its size, or bytes."""

    percent: float = 0.0
    fixed: int = 0

    def of(self, fs_bytes: int) -> int:
        return self.fixed if not self.percent else int(fs_bytes * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.fixed} bytes"


@dataclass(frozen=True)
class CapacityPolicy:
    ratio: float = 1.0  # promises may reach ratio x what the node holds
    reserve: Share = Share(percent=1.0)  # never promised
    low_watermark: Share = Share(percent=10.0)  # below this much free: no new promises

    def __post_init__(self) -> None:
        if not (self.ratio >= 1.0 and math.isfinite(self.ratio)):
            raise ValueError(f"the overprovision ratio must be a number from 1.0, not {self.ratio}")


@dataclass(frozen=True)
class Figures:
    """One reading of the node's storage, in bytes."""

    fs_bytes: int  # size of the state dir's file system
    free: int  # free to the driver on it
    held: int  # what our layers occupy on it
    promised: int  # writable uppers' images + committed layers' allocations
    pending: int  # admitted, not yet recorded
    reserve: int
    watermark: int
    ratio: float
    unwritten: int = 0  # what the writable uppers may still allocate

    @property
    def low(self) -> bool:
        """Below the watermark, with promises the free space may not keep: always when
        overprovisioned; at ratio 1 only when something else took the space."""
        at_risk = self.ratio > 1 or self.unwritten > self.free - self.reserve
        return self.free < self.watermark and at_risk

    @property
    def budget(self) -> int:
        return int(max(0, self.free + self.held - self.reserve) * self.ratio)

    @property
    def available(self) -> int:
        """What may still be promised."""
        return 0 if self.low else max(0, self.budget - self.promised - self.pending)

    def summary(self) -> str:
        return (
            f"{_mib(self.promised + self.pending)} promised of {_mib(self.budget)} "
            f"(ratio {self.ratio:g} x ({_mib(self.free)} free + {_mib(self.held)} held - "
            f"{_mib(self.reserve)} reserve))"
        )

    def low_message(self) -> str:
        return (
            f"node storage is low: {_mib(self.free)} free of {_mib(self.fs_bytes)} on the state dir's "
            f"file system, below the {_mib(self.watermark)} watermark"
        )


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


@dataclass(frozen=True)
class VolumeSizes:
    """The sizes a volume may have on this node, and the one it gets when asked none."""

    default: int = 1 << 30
    minimum: int = MiB
    maximum: int = 0  # --max-volume-size; 0: no limit

    def resolve(self, required: int, limit: int, default: int | None = None) -> int:
        """The capacity for a CSI capacity range (``default`` when it names none:
        the node's, or a source's)."""
        default = self.default if default is None else default
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range bytes must not be negative")
        if limit and required > limit:
            raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
        if required == 0:
            cap = default if not limit else min(default, limit)
        else:
            cap = (required + MiB - 1) // MiB * MiB
            if limit and cap > limit:
                cap = required
        cap = max(cap, self.minimum)
        if limit and cap > limit:
            raise OutOfRange(f"limit_bytes {limit} is below the minimum volume size {self.minimum}")
        if self.maximum and cap > self.maximum:
            raise OutOfRange(f"{cap} bytes exceeds the node's --max-volume-size {self.maximum}")
        return cap


class Capacity:
    """Admission of new promises, and the low-space state (logged when it changes)."""

    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        policy: CapacityPolicy,
        clock: Callable[[], float] = time.monotonic,
        space: Space | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.space: Space = space or backend
        self.policy = policy
        self.clock = clock
        self._guard = threading.Lock()  # one admission at a time: check, then count it
        self._sums = threading.Lock()  # the caches below
        self._pending = 0
        # The layers' figures, kept up to date from the store's log of changed layers, so
        # that a look costs the layers changed since the last one, not all of them.
        self._generation = -1  # the store's layer generation they are of (-1: none read yet)
        self._layers: dict[str, tuple[bool, int]] = {}  # layer -> (active, image bytes)
        self._images = 0  # the writable uppers' image bytes, summed
        self._committed: dict[str, int] = {}  # committed layer -> allocation (fixed)
        self._committed_sum = 0
        self._active: dict[str, int] = {}  # writable upper -> allocation, as last read
        self._active_sum = 0
        self._active_read = -HELD_TTL
        self._was_low = False
        self._state = threading.Lock()  # one log line per change, from any thread
        self._settling = threading.Lock()
        self.settled = 0  # checkpoints of every volume done, for tests and logs
        self.last_ration: Ration | None = None  # what the last look of ``ration`` decided

    # ---- what a volume takes ------------------------------------------------
    def upper_size(self, capacity: int, fs_type: str) -> int:
        """The size of a volume's upper: the volume's full capacity.

        Not less: overlayfs copies a whole file up before the first write to it,
        so a volume must be able to hold any file of its layers again in its
        upper. What the layers already hold is reported in the volume's stats.
        """
        return self.backend.size_for(capacity, fs_type)

    def allocation(self, v: Volume) -> int:
        """What a volume's upper occupies now: a snapshot or a clone of the volume
        turns it into a committed layer (or copies it), so the node promises it again."""
        return self.backend.usages([v.upper])[v.upper]

    # ---- readings -----------------------------------------------------------
    def figures(self) -> Figures:
        """The figures now. Allocations are read from the host per layer: a committed
        layer's once, the writable uppers' at most every ``HELD_TTL`` seconds."""
        fs_bytes, free = self.space.fs_size(), self.space.free_bytes()
        with self._sums:
            self._catch_up()
            images, held_committed, held_active = self._images, self._committed_sum, self._active_sum
        f = Figures(
            fs_bytes=fs_bytes,
            free=free,
            # reflinked layers share blocks that each file counts: never more than is used
            held=min(held_committed + held_active, fs_bytes - free),
            promised=images + held_committed,
            pending=self._pending,
            reserve=self.policy.reserve.of(fs_bytes),
            watermark=self.policy.low_watermark.of(fs_bytes),
            ratio=self.policy.ratio,
            unwritten=max(0, images - held_active),
        )
        self._note(f)
        return f

    def low(self) -> str:
        """'' or why new promises are refused and thin volumes are at risk; two
        statvfs while there is room, so conditions may ask it per call."""
        fs_bytes, free = self.space.fs_size(), self.space.free_bytes()
        if free >= self.policy.low_watermark.of(fs_bytes):
            with self._state:
                noted = not self._was_low
            if noted:
                return ""
        f = self.figures()  # near the watermark (or leaving it): the whole picture
        return f.low_message() if f.low else ""

    def _catch_up(self) -> None:
        """Bring the layers' figures to the store's state: the rows of the layers changed
        since the last look (all of them at the first, or when the store cannot tell), a
        new layer's allocation at once, every writable upper's again each ``HELD_TTL``."""
        generation, changed = self.store.layer_changes(self._generation)
        if changed is None or len(changed) > MAX_CHANGED:
            with self.store.read() as tx:
                rows = tx.layer_sizes()
            changed = set(rows) | set(self._layers)
        elif changed:
            with self.store.read() as tx:
                rows = tx.layer_sizes(changed)
        else:
            rows = {}
        self._generation = generation
        new_active, new_committed = [], []
        for layer_id in changed:
            if rows.get(layer_id) == self._layers.get(layer_id):
                continue  # as it was (a full read): a committed layer's allocation is not read again
            old = self._layers.pop(layer_id, None)
            if old is not None and old[0]:
                self._images -= old[1]
                self._active_sum -= self._active.pop(layer_id, 0)
            elif old is not None:
                self._committed_sum -= self._committed.pop(layer_id, 0)
            row = rows.get(layer_id)
            if row is not None:
                self._layers[layer_id] = row
                if row[0]:
                    self._images += row[1]
                    new_active.append(layer_id)
                else:
                    new_committed.append(layer_id)
        for layer_id, n in self.backend.usages(new_committed).items():
            self._committed[layer_id] = n
            self._committed_sum += n
        now = self.clock()
        if now - self._active_read >= HELD_TTL:
            self._active = self.backend.usages([x for x, (active, _) in self._layers.items() if active])
            self._active_sum = sum(self._active.values())
            self._active_read = now
        else:
            for layer_id, n in self.backend.usages(new_active).items():
                self._active[layer_id] = n
                self._active_sum += n

    def watch(self) -> bool:
        """One look of the background watch: True while storage is low (and then the
        volumes' journals are checkpointed)."""
        self.store.reserve.restore()  # given back when the disk was full; taken again with room
        if not self.low():
            return False
        self.settle()
        return True

    def ration(self) -> Ration:
        """One look of the rationing: the writable volumes may take together what the
        disk has free less the slop (and less the reserve when that is larger)."""
        fs_bytes, free = self.space.fs_size(), self.space.free_bytes()
        keep = max(slop(fs_bytes), self.policy.reserve.of(fs_bytes))
        self.last_ration = self.backend.ration(max(0, free - keep))
        return self.last_ration

    def settle(self) -> None:
        """Checkpoint every volume's journal; one run at a time, a second caller returns."""
        if not self._settling.acquire(blocking=False):
            return
        try:
            self.backend.settle()
            self.settled += 1
        finally:
            self._settling.release()

    def close(self, timeout: float = 60.0) -> None:
        """Wait for a checkpoint in progress (the driver stops): none is left frozen."""
        if self._settling.acquire(timeout=timeout):
            self._settling.release()

    def _note(self, f: Figures) -> None:
        """Log each change of the low-space state once; on entering it, checkpoint."""
        with self._state:
            if f.low == self._was_low:
                return
            self._was_low = f.low
        if f.low:
            log.warning("%s; new volumes, snapshots and clones are refused", f.low_message())
            threading.Thread(target=self.settle, name="settle", daemon=True).start()
        else:
            log.info(
                "node storage recovered: %s free of %s; new volumes are admitted again",
                _mib(f.free),
                _mib(f.fs_bytes),
            )

    def largest_volume(self, fs_type: str) -> int:
        """The capacity of the largest volume the node can still promise."""
        room = self.figures().available
        if fs_type == "block":
            return room // 4096 * 4096
        lo, hi = 0, room // MiB
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.backend.size_for(mid * MiB, fs_type) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo * MiB

    # ---- admission ----------------------------------------------------------
    @contextmanager
    def admit(self, need: int, what: str, refuse: type[DriverError] = ResourceExhausted) -> Iterator[None]:
        """Count ``need`` bytes as promised while the caller builds and records
        ``what``; ``refuse`` (RESOURCE_EXHAUSTED), with the figures, when they do not fit."""
        if need <= 0:  # nothing new is promised (an expansion to the size it has)
            yield
            return
        with self._guard:
            f = self.figures()
            if f.low:
                raise refuse(f"{what} refused: {f.low_message()}; free space on the node")
            if need > f.available:
                raise refuse(
                    f"{what} needs {_mib(need)} but the node can promise only {_mib(f.available)} more: "
                    f"{f.summary()}; raise --overprovision-ratio to promise more than the disk holds"
                )
            self._pending += need
        try:
            yield
        finally:
            with self._guard:
                self._pending -= need
