"""The one interface between "what a volume is" and "how a layer is kept on disk".

Modelled on containerd's Snapshotter: the engine's store decides which layers
exist and how they stack (ids, parents, names, who uses them); a backend keeps
their bytes and answers with mounts as data, never mounting a volume itself.

Every change to the set of layers happens in two halves so that one store
transaction can record it: the backend *builds* a layer in a private scratch
directory the engine hands it (``prepare``, ``capture``, ``squash``,
``import_tree``), then ``install`` moves the build into place inside the
transaction that adds the layer's row, and ``expose`` makes it usable as a
lower once that transaction has committed. A crash before the commit leaves a
scratch dir or an unknown layer dir; ``cleanup`` removes both at the next start.

Layers are ``store.Layer`` records: the backend reads the fields it owns (its
``fs_type``, ``image_bytes``, ``base_bytes`` and ``link``) and the parent chain,
nearest first, which the engine passes in.

The accounting contract. A layer's data (``Built.used_bytes``, what ``commit``
returns, and ``FsUsage.used_bytes`` with its file system's own overhead where
it has one) is the change over its parent: what it holds that its parent chain
does not, never the parents' data again. The engine adds these figures up along
a chain (a volume's used bytes, a snapshot's size), so it relies on that;
``Capabilities.stacks`` says a backend keeps it, and both backends here do (the
plain-directory one, whose layers are copies, by comparing a copy with its
parent). ``usage`` is another figure: the bytes the host spends on the layer's
own storage, summed over all layers as the node's allocation and never along a
chain, so a copy that really spends its parent's bytes again counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from csi_driver.host import MountEntry, Mounts
from csi_driver.host.mount_manager import Mount  # the data backends answer with (host performs it)
from csi_driver.layerstore.layertar import DiffStats
from csi_driver.store import Layer


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers; the engine and services ask, never assume."""

    fs_types: frozenset[str]  # file system types for mount volumes, e.g. {"ext4", "xfs"}
    default_fs_type: str  # used when a request names none
    block: bool  # raw block volumes
    artifact_fs_types: frozenset[str]  # layer fs types it can import from a registry manifest
    modifiable: frozenset[str]  # ModifyVolume parameter names it accepts (validated by backend.tune)
    enforces_capacity: bool  # False: a volume may write past its size (plain directories)
    stacks: bool  # True: a layer's used bytes are the change over its parent


@dataclass(frozen=True)
class Built:
    """What a build made: the layer's size and the data it holds beyond its empty baseline."""

    image_bytes: int
    used_bytes: int = 0
    base_bytes: int = 0
    fs_type: str = ""  # set by builds whose kind the caller cannot know (squash, import_tree)


@dataclass(frozen=True)
class FsUsage:
    """An active layer's file system as the pod sees it (statvfs)."""

    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int


@dataclass(frozen=True)
class Ration:
    """What one look of ``LayerBackend.ration`` decided (for logs, metrics and tests)."""

    limited: bool  # whether the writable layers' allocations are limited now
    room: int  # host bytes they may take together until the next look
    unbacked: int  # bytes they have allocated that the host does not hold yet
    shares: dict[str, int] = field(default_factory=dict)  # limited: each layer's share, bytes


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Unsupported(Exception):
    """The backend cannot do this (a raw block volume on a directory backend, say)."""


@runtime_checkable
class LayerBackend(Protocol):
    """How layers are kept. Every method is safe to repeat after a crash."""

    #: a short name for logs, metrics and ``doctor``
    name: str
    #: what it offers: fs types, raw block, importable artifacts, mutable parameters
    capabilities: Capabilities

    def new_link(self) -> str:
        """A unique short name for a new layer's record (``Layer.link``): the backend's
        own handle for it (overlay's ``l/<link>`` keeps deep lowerdir options short)."""

    def size_for(self, capacity: int, fs_type: str) -> int:
        """The size an active layer needs to offer ``capacity`` bytes to files."""

    # ---- builds (nothing is visible until ``install``) ----------------------
    def prepare(self, build: Path, parents: Sequence[Layer], size: int, fs_type: str) -> Built:
        """An active layer over ``parents`` (its chain, nearest first; empty for none)
        that can hold ``size`` bytes of data. A backend that stacks (overlayfs) makes
        it empty; one that cannot stack copies the parent's tree into it."""

    def prepare_block(self, build: Path, size: int, source: Path | None) -> Built:
        """A raw block layer of ``size`` bytes: a copy of ``source``'s bytes, or with no
        source what a ``capture`` into this build left (grown to ``size``), or empty."""

    def capture(
        self, builds: Mapping[str, Path], layers: Sequence[Layer], frozen_hook: Callable[[], None] = ...
    ) -> dict[str, Built]:
        """Point-in-time copies of active layers in use, all taken at one instant
        (a group's members stay consistent with each other); ``builds`` maps each
        layer id to the dir its copy goes to. ``frozen_hook`` runs at that instant
        (crash tests stop there)."""

    def live_copy_bytes(self, layer: Layer) -> int:
        """What ``capture`` of this active layer in use copies while its volume's
        writes wait: 0 where the capture is a clone (O(1)) or does not stop writes."""

    def squash(self, build: Path, chain: Sequence[Layer]) -> Built:
        """One committed layer holding the merged view of ``chain`` (nearest first)."""

    def import_tree(self, build: Path, source: Path) -> Built:
        """A committed layer holding a directory's tree or a tar archive's."""

    def import_diff(
        self, build: Path, diff: BinaryIO, parents: Sequence[Layer], size_hint: int = 0, entries: int = 0
    ) -> Built:
        """A committed layer over ``parents`` (nearest first) from an OCI layer tar
        (uncompressed, read as a stream): its files, and its whiteouts hiding what
        the parents hold. ``size_hint``: the tar's size when known (the backend may
        then build in place); ``entries``: its entry count when known (an image
        then gets an inode for each, and a tar of more entries raises
        ``layertar.TooManyEntries``). The tar is untrusted (``layertar.DiffError``)."""

    def install(self, build: Path, layer: Layer) -> None:
        """Move a build into place as ``layer`` (inside the transaction adding its row)."""

    def expose(self, layer: Layer) -> None:
        """Make an installed layer usable as a lower (after its row is committed)."""

    def remove(self, layer: Layer) -> None:
        """Delete a layer the store no longer knows; a missing layer is fine."""

    def export_diff(self, chain: Sequence[Layer], scratch: Path, out: BinaryIO) -> DiffStats:
        """Write the top layer of the committed ``chain`` (nearest first) to ``out``
        as an OCI layer tar: what it changes over the layers below it (its entries
        are counted in what it returns). ``scratch`` is an empty private dir for
        views the export may mount."""

    def export_diff_over(
        self, base: Sequence[Layer], chain: Sequence[Layer], scratch: Path, out: BinaryIO
    ) -> DiffStats:
        """Write the merged view of the committed ``chain`` to ``out`` as an OCI layer
        tar over the merged view of another committed chain, ``base`` (both nearest
        first): what changed from one to the other, file contents compared where the
        metadata is equal (an incremental export over an earlier one). ``scratch``
        as for ``export_diff``."""

    # ---- changes in place ---------------------------------------------------
    def commit(self, layer: Layer) -> int:
        """Make a detached active layer immutable in place; return the data it holds
        beyond its empty baseline that its parent does not (the accounting
        contract above). The store flips its row; a crash before it does leaves
        the layer active, and commit is then called again."""

    def size(self, layer: Layer) -> int:
        """The bytes an active layer's storage has now (its image's size)."""

    def resize(self, layer: Layer, size: int) -> None:
        """Give an active layer's image ``size`` bytes (the file system is not touched)."""

    def grow_fs(self, layer: Layer) -> int:
        """Grow an active layer's file system to fill its image, online when it is
        active; return the bytes of metadata the growth added to its baseline."""

    def check_tune(self, params: Mapping[str, str], fs_type: str) -> None:
        """Raise ``errors.InvalidArgument`` naming the first value of ``params`` (names
        from ``capabilities.modifiable``) a layer of ``fs_type`` cannot take; ``fs_type``
        '' when the volume is not known here (the central controller)."""

    def tune(self, layer: Layer, params: Mapping[str, str]) -> None:
        """Apply mutable parameters (checked by ``check_tune``) to an active layer."""

    # ---- use ----------------------------------------------------------------
    def activate(self, layer: Layer) -> None:
        """Make a layer readable (and an active one writable); counted per caller."""

    def deactivate(self, layer: Layer) -> None:
        """Undo one ``activate``; the last one releases what it holds."""

    def is_active(self, layer: Layer) -> bool:
        """Whether the layer is activated (by this process or one before it)."""

    def active_layers(self) -> set[str]:
        """The layers this process holds activated."""

    def mounts(self, chain: Sequence[Layer]) -> list[Mount]:
        """The mounts that show ``chain`` (nearest first) as one tree: read-write
        when the nearest layer is active, read-only otherwise (a view)."""

    def mounted_layer(self, entry: MountEntry) -> str | None:
        """The active layer a mount-table entry shows (a mount made from
        ``mounts([layer, ...])``), or None when the entry is not one of ours."""

    def usage(self, layer: Layer) -> int:
        """Bytes the host really spends on the layer's own storage (see the
        accounting contract above: a node's allocation, not a volume's data)."""

    def usages(self, layer_ids: Sequence[str]) -> dict[str, int]:
        """``usage`` of many layers by id, for sums over thousands of them."""

    def fs_usage(self, layer: Layer) -> FsUsage | None:
        """An active layer's file system figures, None when it is not activated;
        ``used_bytes`` holds none of its parents' data (the accounting contract)."""

    def health(self, layer: Layer, table: Mounts | None = None) -> str:
        """An empty string when the layer is usable, else what is wrong ("its image
        is missing"); ``table`` lets it look at the mount table read for the call."""

    def describe(self, layer: Layer) -> dict[str, str]:
        """Where and how a layer is kept, for operators (paths, mount point)."""

    def block_file(self, layer: Layer) -> Path:
        """The file behind a raw block layer (its bytes, for copies and exports)."""

    def block_mount(self, layer: Layer, readonly: bool = False) -> Mount:
        """What a raw block layer's device is made of: a ``loop`` Mount over its file
        (sector size, direct I/O; ``ro`` when ``readonly``), which the mount manager
        attaches and detaches. The engine never attaches a device itself."""

    def import_block(self, build: Path, size: int, fill: Callable[[int], int]) -> Built:
        """A raw block layer of ``size`` bytes built from elsewhere (a registry blob):
        an empty sparse image that ``fill`` writes into (given its open descriptor)."""

    def block_capture(self, layer: Layer, build: Path, devices: Sequence[str]) -> Built:
        """Copy a block layer's bytes at one instant into a build; ``devices`` are
        the loop devices it is attached to (none when detached)."""

    # ---- housekeeping -------------------------------------------------------
    def walk(self) -> list[str]:
        """The ids of every layer on disk, known to the store or not."""

    def cleanup(self, known: Mapping[str, Layer], keep_devices: set[str]) -> CleanupReport:
        """At start-up, after the engine re-activated what staged volumes use: remove
        what the store does not know (layer dirs, links), release what an earlier
        process left activated and nobody holds now, and detach loop devices of
        its layers except ``keep_devices`` (raw block volumes in use: devices that
        hold a ``block_mount``)."""

    def settle(self) -> None:
        """Write what active layers hold in journals to its place now (the host
        disk is running low: later it may have no room for it)."""

    def ration(self, room: int) -> Ration:
        """Keep the writable layers from allocating, together, more than ``room``
        bytes of the host until the next call (a few times a second): what they
        allocate beyond it fails in the writer's own volume with ENOSPC, and never
        as a write the host cannot back. A backend whose layers cannot outgrow
        their promise (or cannot be limited) says so with ``limited=False``."""

    def devices(self) -> int:
        """How many block devices (loop devices) its layers are attached to now (metrics)."""

    def free_bytes(self) -> int:
        """Bytes still free where layers are kept."""

    def fs_size(self) -> int:
        """Size of the file system where layers are kept."""

    def close(self) -> None:
        """Stop what the backend runs in the background (the driver stops)."""
