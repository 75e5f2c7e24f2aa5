"""The host's free space shared out among the writable ext4 uppers, so that none of
them allocates a block the host cannot back.

An upper is a sparse image. Its ext4 allocates a block inside the image at once, and
the host file system backs the block only when it is written back. On a full host
that write fails: for data, the writer's fsync says so (ENOSPC); for metadata (a
directory's new block, an extent block, the dirs overlayfs makes at mount) the
journal aborts and the whole volume turns read-only, a neighbour of the volume that
filled the disk as much as the filler itself. So on an overprovisioned node the
uppers must not be able to allocate, together, more than the host has free.

Each look (``apply``, a few times a second) reads per mounted upper what its ext4
has allocated that the image does not back yet (*unbacked*) and what it could still
allocate. When all of that fits in ``room`` (the host's free space less the slop
the engine keeps back), nothing is limited. Otherwise what the room leaves after the
unbacked blocks is shared out, a quarter in equal parts and the rest by each upper's
growth since the last look, and each upper's ext4 gets the rest of its free space reserved
(``host.fsreserve``): a write() beyond its share fails at once with ENOSPC, in the
writer's own volume, and its file system goes on. Between two looks the uppers
together can take no more than the room, whatever the timing, so the host never
fills from them. An upper that uses its share up before the next look sees ENOSPC
early; the next look gives it more if there is more.

xfs uppers and block volumes are not limited (xfs retries a metadata write until
there is room; a raw device has no allocator to ask): their unbacked blocks count
against the room all the same.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver import host
from csi_driver.layerstore.backend import Ration
from csi_driver.layerstore.overlay.layout import Layout

log = logging.getLogger(__name__)

#: 1/EVEN_PART of what is left goes in equal parts (a volume that starts writing gets
#: that much at once), the rest by each volume's growth since the last look
EVEN_PART = 4


@dataclass(frozen=True)
class _Reading:
    layer_id: str
    device: str
    block: int  # the ext4's block size
    clusters: int  # its blocks in all
    free: int  # blocks free (statfs f_bfree: dirty delayed allocations excluded)
    used: int  # bytes allocated in the file system
    unbacked: int  # bytes allocated in it that the image does not hold yet
    default: int  # the clusters ext4 reserves by itself


def read_upper(layout: Layout, layer_id: str, device: str) -> _Reading | None:
    """One upper's figures, or None when it is not mounted (any more)."""
    try:
        st = os.statvfs(layout.mnt(layer_id))
        image = os.stat(layout.image(layer_id))
    except OSError:
        return None
    block = st.f_frsize
    clusters = image.st_size // block
    used = (st.f_blocks - st.f_bfree) * block
    overhead = image.st_size - st.f_blocks * block  # journal, tables: held, or counted here
    unbacked = max(0, used + overhead - image.st_blocks * 512)
    return _Reading(
        layer_id,
        device,
        block,
        clusters,
        st.f_bfree,
        used,
        unbacked,
        host.fsreserve.default_reserved_clusters(clusters),
    )


class Rationing:
    """Shares the room out among the ext4 uppers that ``writable`` lists mounted."""

    def __init__(
        self,
        layout: Layout,
        writable: Callable[[], dict[str, str]],
        device: Callable[[str], str | None],
    ) -> None:
        self.layout = layout
        self._writable = writable
        self._device = device
        self._lock = threading.Lock()
        self._limited: dict[str, int] = {}  # upper -> clusters we reserve in it
        self._last_used: dict[str, int] = {}
        self._floor = 0  # bytes an upper mounted between two looks may take
        self._refused: set[str] = set()  # uppers whose limit the kernel refused (logged once)
        self._seen: set[str] = set()  # uppers whose reserve was read once (a restart's leftovers)
        self.limited = False

    def apply(self, room: int) -> Ration:
        """One look: limit the uppers to ``room`` host bytes together, or lift the limits."""
        with self._lock:
            readings, others = self._read()
            unbacked = sum(r.unbacked for r in readings) + others
            could = sum(max(0, r.free - r.default) * r.block for r in readings)
            if unbacked + could <= room:
                self._lift(readings)
                return Ration(False, room, unbacked)
            spare = max(0, room - unbacked)
            growth = {r.layer_id: max(0, r.used - self._last_used.get(r.layer_id, r.used)) for r in readings}
            grown = sum(growth.values())
            even = spare // EVEN_PART // max(1, len(readings))
            by_growth = spare - even * len(readings)
            shares = {}
            for r in readings:
                share = by_growth * growth[r.layer_id] // grown if grown else by_growth // len(readings)
                shares[r.layer_id] = even + share
                self._limit(r, shares[r.layer_id])
            self._last_used = {r.layer_id: r.used for r in readings}
            self._floor = even
            if not self.limited:
                log.warning(
                    "the volumes could allocate %d MiB more than the node's disk has free (%d MiB, "
                    "less its slop): each writable volume now gets a share of what is free, and a "
                    "write beyond it fails with ENOSPC in that volume",
                    (unbacked + could - room) >> 20,
                    room >> 20,
                )
            self.limited = True
            # an upper mounted during this look, which its admit saw unlimited yet, gets
            # its even share now (one look after the other: admit never waits for a look)
            for layer_id, fs_type in self._writable().items():
                if fs_type == "ext4" and layer_id not in shares and (device := self._device(layer_id)):
                    if (r := read_upper(self.layout, layer_id, device)) is not None:
                        self._limit(r, self._floor)
            return Ration(True, room, unbacked, shares)

    def admit(self, layer_id: str) -> None:
        """A writable upper was just mounted: while the uppers are limited, it may take
        its even share until the next look (its ext4 reserved the default at mount).

        While they are not, it returns at once, without the lock: a look holds that
        while it reads every upper (milliseconds with hundreds staged), and a stage must
        not wait for it. A look that limits them limits an upper it did not read too."""
        if not self.limited:
            return
        with self._lock:
            if not self.limited:
                return
            device = self._device(layer_id)
            r = read_upper(self.layout, layer_id, device) if device else None
            if r is not None:
                self._limit(r, self._floor)

    def _read(self) -> tuple[list[_Reading], int]:
        """The ext4 uppers' readings, and the unbacked bytes of the others (xfs)."""
        readings, others = [], 0
        for layer_id, fs_type in sorted(self._writable().items()):
            device = self._device(layer_id)
            r = read_upper(self.layout, layer_id, device) if device else None
            if r is None:
                continue
            if fs_type == "ext4":
                readings.append(r)
                if layer_id not in self._seen:  # a limit an earlier process left: ours now
                    self._seen.add(layer_id)
                    self._adopt(r)
            else:
                others += r.unbacked
        mounted = {r.layer_id for r in readings}
        for layer_id in self._limited.keys() - mounted:  # unmounted: a new mount has ext4's default
            del self._limited[layer_id]
        self._seen &= mounted
        return readings, others

    def _adopt(self, r: _Reading) -> None:
        """Count a reserve other than ext4's default as a limit to lift or renew."""
        try:
            now = host.fsreserve.reserved_clusters(r.device)
        except OSError:
            return
        if now != r.default:
            self._limited[r.layer_id] = now

    def _limit(self, r: _Reading, share: int) -> None:
        """Reserve what ``r`` has free beyond ``share`` bytes."""
        want = min(r.clusters - 1, max(r.default, r.free - share // r.block))
        if self._limited.get(r.layer_id) == want:
            return
        try:
            host.fsreserve.set_reserved_clusters(r.device, want)
        except OSError as e:  # unmounted meanwhile, or the kernel refused: the next look tries again
            if r.layer_id not in self._refused:  # once, not at every look
                log.warning("could not limit layer %s (%s): its writes are not shared out", r.layer_id, e)
                self._refused.add(r.layer_id)
            return
        self._refused.discard(r.layer_id)
        self._limited[r.layer_id] = want

    def _lift(self, readings: list[_Reading]) -> None:
        if self.limited:
            log.info("the node's disk holds what the volumes may allocate again: their limits are lifted")
        self.limited = False
        for r in readings:
            if r.layer_id in self._limited:
                try:
                    host.fsreserve.set_reserved_clusters(r.device, r.default)
                except OSError as e:
                    log.info("could not lift the limit of layer %s: %s", r.layer_id, e)
                    continue
                del self._limited[r.layer_id]
        self._last_used = {}
