"""Layers to and from OCI registries: snapshot exports, restores anywhere, base images.

A snapshot is pushed as an OCI artifact (its format: ``registry.artifact``):
one blob per layer of its chain, bottom first, each an OCI layer tar
(``LayerBackend.export_diff``), uncompressed or compressed with the codec the
VolumeSnapshotClass names (``registry.codec``), and a manifest whose
annotations say what the snapshot is. A layer's blob
digest is recorded when it is first exported or pulled, so a later push asks
the registry about it (HEAD) before exporting anything: a chain shares blobs
with the snapshots before it, and a second push uploads only new layers.

A pull goes the other way. A blob whose descriptor announces what its tar
expands to (our own exports: ``artifact.announced``) is built
into a scratch dir as it downloads, in one pass, and its size and sha256 are
checked at the end of the stream, before the layer may be installed; any other
blob is downloaded into the scratch dir, checked, counted, then built. A layer this node already
made from the same blob over the same parent is used again, but knowing a
digest is not access to its content: the layer is used as it is only when this
node pulled that blob from the same repository or pushed it there (and the
registry just served the manifest to the caller); otherwise the caller's
registry must serve the blob itself, which is downloaded and checked, and only
then is the layer used (and the repository recorded for next time). All new layers and
the record that uses them (a snapshot row, or a named base layer) are added in
one store transaction at the end, so a failed or partial pull leaves nothing
installed: its scratch dir goes, and a crash leaves only a scratch dir, which
the next start removes.

Registry answers are untrusted: ``registry.client`` checks digests, sizes and
the manifest schema, ``registry.artifact`` what the manifest claims about the
snapshot, and ``layerstore.layertar`` what the tars hold.
"""

from __future__ import annotations

import errno
import gzip
import logging
import platform
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from csi_driver.engine.builds import LayerBuilds
from csi_driver.engine.capacity import Capacity
from csi_driver.engine.context import BLOCK, SNAPSHOT_PREFIX
from csi_driver.engine.records import Records
from csi_driver.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from csi_driver.ids import untagged
from csi_driver.layerstore import blockimage
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.layerstore.blockimage import MEDIA_TYPE as BLOCK_MEDIA_TYPE
from csi_driver.layerstore.layertar import DiffError, TooManyEntries, count_tar
from csi_driver.locks import KeyedLocks
from csi_driver.registry import artifact, cancel, codec
from csi_driver.registry.client import (
    DOCKER_LIST,
    OCI_INDEX,
    BadContent,
    Descriptor,
    Manifest,
    RegistryClient,
    descriptors,
)
from csi_driver.registry.credentials import Credentials
from csi_driver.registry.progress import count_blob
from csi_driver.registry.reference import DIGEST_RE, BadReference, Reference, Repository
from csi_driver.store import Blob, Layer, PendingDelete, ReadTx, Snapshot, Store

log = logging.getLogger(__name__)

MiB = 1 << 20
LAYER_TAR = codec.LAYER_TAR
MAX_SNAPSHOT_ID = 128  # CSI: an id of at most 128 bytes
MAX_LAYERS = 128  # more than a chain at the default depth cap ever holds
#: a compressed layer that announces nothing (a foreign image's) may expand this much (plus
#: 64 MiB), no further; one that announces its expansion is read no further than that
GZIP_RATIO = 20
GZIP_SLACK = 64 * MiB
#: Entries (inodes of its image) a pulled layer may hold. Container layers hold
#: tens of thousands (a Node or Python tree, a distribution's /usr: 20k-200k);
#: a million is 5 times the largest seen, 256 MiB of inode table, and bounds
#: what a small hostile gzip (150,000 empty entries fit in 1 MB) can cost.
MAX_LAYER_ENTRIES = 1_000_000
#: What a tar or gzip that is no valid layer raises while it is read (OSError: some of them)
_NOT_A_LAYER = (
    DiffError,
    OSError,
    EOFError,
    zlib.error,
    OverflowError,
    ValueError,
    RecursionError,
    *codec.DECODE_ERRORS,
)
#: An incremental export stacks one layer on an earlier export's; a manifest of this
#: many layers is followed by a whole export (a restore stacks them all)
MAX_INCREMENTAL_LAYERS = 32
PULL_WAIT_SECONDS = 60.0  # at most this long for another pull of the same reference (then ABORTED)


def exported_id(repository: Repository, local_id: str) -> str:
    """An exported snapshot's id is the reference of its artifact: any node can pull it."""
    snapshot_id = str(repository.at(local_id))
    if len(snapshot_id.encode()) > MAX_SNAPSHOT_ID:
        raise InvalidArgument(
            f"repository {str(repository)[:80]!r} is too long: a snapshot id ({snapshot_id[:40]}...) "
            f"must fit in {MAX_SNAPSHOT_ID} bytes; use a repository of at most "
            f"{MAX_SNAPSHOT_ID - len(local_id) - 1} characters"
        )
    return snapshot_id


def snapshot_reference(snapshot_id: str) -> Reference | None:
    """The artifact an exported snapshot's id names, or None for a local id."""
    repo, sep, tag = snapshot_id.rpartition(":")
    if not sep or "/" not in repo or not tag.startswith(SNAPSHOT_PREFIX):
        return None
    try:
        return Repository.parse(repo).at(tag)
    except BadReference:
        return None


class _Counting:
    """A writer that counts what goes through it (a tar's size, before it is compressed)."""

    def __init__(self, f: codec.Writer) -> None:
        self._f = f
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        n = self._f.write(data)
        n = len(data) if n is None else n  # zstd's writer answers what it consumed
        self.size += n
        return n


class _Bounded:
    """A reader that refuses to go past ``limit`` bytes (a decompression bomb), and counts them."""

    def __init__(self, f: BinaryIO, limit: int, why: str) -> None:
        self._f, self._left, self._why = f, limit, why
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._left -= len(data)
        self.count += len(data)
        if self._left < 0:
            raise DiffError(self._why)
        return data

    def seekable(self) -> bool:
        return False


def _layer_need(tar_bytes: int, entries: int) -> int:
    """What admission promises for one layer's image: its expanded tar, a block
    and an inode per entry (what ``image_size_for_entries`` sizes it for)."""
    return tar_bytes + tar_bytes // 4 + 4096 * entries + 256 * (entries + entries // 8) + 16 * MiB


@dataclass(frozen=True)
class _Base:
    """An earlier export an incremental one builds on: its snapshot, chain and blobs."""

    snapshot: Snapshot
    chain: list[Layer]
    blobs: list[Descriptor]


class Transfers:
    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        records: Records,
        builds: LayerBuilds,
        capacity: Capacity,
        insecure: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.builds = builds
        self.capacity = capacity
        self.insecure = insecure
        self._pulls = KeyedLocks()  # one pull per reference at a time

    def _one_pull(self, key: str) -> Any:
        """Hold ``key``'s pull lock, waiting for another pull of it no longer than the
        transfer's deadline and ``PULL_WAIT_SECONDS`` (then ABORTED, which callers retry)."""
        return self._pulls.hold(key, lambda lock: cancel.wait_for(lock, key, PULL_WAIT_SECONDS))

    def client(self, repository: Repository, credentials: Credentials | None) -> RegistryClient:
        return RegistryClient(
            repository, credentials, insecure=repository.host in self.insecure, insecure_hosts=self.insecure
        )

    @contextmanager
    def _pinned(self, layer_ids: list[str]) -> Iterator[None]:
        """Keep layers from garbage collection while a transfer reads or builds on them."""
        for layer_id in layer_ids:
            self.store.pin(layer_id)
        try:
            yield
        finally:
            for layer_id in layer_ids:
                self.store.unpin(layer_id)

    # ---- push -----------------------------------------------------------------
    def push_snapshot(
        self,
        snap: Snapshot,
        credentials: Credentials | None,
        repository: Repository | None = None,
        compression: str = codec.NONE,
    ) -> Reference:
        """Push a snapshot to ``repository`` (default: the one its id names), tagged
        with its local id, its new layers compressed with ``compression``; return the
        artifact's reference, which is the id to restore it by anywhere. Repeating it
        uploads nothing the registry has."""
        own = snapshot_reference(snap.id)
        if repository is None and own is None:
            raise InvalidArgument(f"snapshot {snap.id} names no repository; say where to push it")
        local_id = own.tag if own is not None else untagged(snap.id)  # an OCI tag holds no '@'
        ref = Reference.parse(exported_id(repository, local_id)) if repository else own
        assert ref is not None
        client = self.client(ref.repository, credentials)
        chain = self.records.chain(snap.layer)
        with self._pinned([x.id for x in chain]), ExitStack() as held:
            base = (
                None if snap.access_type == BLOCK else self._export_base(snap, ref.repository, client, held)
            )
            if snap.access_type == BLOCK:  # one blob of the whole image, holes left out
                layers = [self._push_block(client, chain[0])]
            elif base is None:
                layers = [
                    self._push_layer(client, chain[i:], compression) for i in reversed(range(len(chain)))
                ]
            else:  # the earlier export's blobs: its manifest says the registry holds them
                for _blob in base.blobs:
                    count_blob("push", "skipped")
                layers = base.blobs + self._push_over(client, base, chain, compression)
            with self.builds.scratch() as scratch:
                config = scratch / "config"
                config.write_bytes(artifact.EMPTY_CONFIG_BYTES)
                client.push_blob(config, artifact.EMPTY_CONFIG.digest, artifact.EMPTY_CONFIG.size)
        manifest = artifact.snapshot_manifest(snap, layers)
        cancel.check()  # the snapshot is ready once the manifest is stored: not after the deadline
        digest = client.push_manifest(manifest, ref.tag or "")
        if str(ref) == snap.id:
            with self.store.tx() as tx:
                tx.set_exported(snap.id, digest)
        log.info("snapshot %s pushed as %s: %d layers, manifest %s", snap.id, ref, len(layers), digest[:19])
        return ref

    def _export_base(
        self, snap: Snapshot, repository: Repository, client: RegistryClient, held: ExitStack
    ) -> _Base | None:
        """The export ``snap`` goes on top of: the newest earlier snapshot of the same
        volume that is held here (its chain pinned in ``held``) and exported to the same
        repository, whose manifest that registry still serves, with room for more layers
        (``MAX_INCREMENTAL_LAYERS``); None for a whole export."""
        with self.store.read() as tx:
            earlier = [
                s
                for s in tx.snapshots(source_volume_id=snap.source_volume_id)
                if s.seq < snap.seq
                and s.exported
                and s.access_type != BLOCK
                and (own := snapshot_reference(s.id)) is not None
                and str(own.repository) == str(repository)
            ]
            if not earlier:
                return None
            base = earlier[-1]
            self.store.pin(base.layer)  # before the read ends: no collection in between
            held.callback(self.store.unpin, base.layer)
            chain = tx.chain(base.layer)
        try:
            manifest = client.pull_manifest(base.exported)
        except NotFound:
            log.info("snapshot %s: its earlier export %s is gone, pushed whole", snap.id, base.id)
            return None
        if not artifact.is_snapshot(manifest):
            return None
        blobs = descriptors(manifest.body.get("layers"), f"snapshot {base.id}")
        if not blobs or len(blobs) >= MAX_INCREMENTAL_LAYERS:
            return None  # a restore would stack too many layers: a whole export starts anew
        return _Base(base, chain, blobs)

    def _push_over(
        self, client: RegistryClient, base: _Base, chain: list[Layer], compression: str
    ) -> list[Descriptor]:
        """The blobs that make ``chain``'s view out of ``base``'s: the layers above the
        base's own layer when the chain holds it (a detached volume's snapshots), else
        one tar of what changed between the two views (a capture of a volume in use)."""
        ids = [x.id for x in chain]
        if base.snapshot.layer in ids:
            above = ids.index(base.snapshot.layer)
            return [self._push_layer(client, chain[i:], compression) for i in reversed(range(above))]
        cancel.check()
        top = chain[0]
        with self.builds.scratch() as scratch:
            digest, size, tar_size, stats = _streamed(
                client,
                scratch,
                compression,
                lambda views, tar: self.backend.export_diff_over(base.chain, chain, views, tar),
                top.used_bytes,
            )
        log.info(
            "layer %s pushed as %d bytes of changes (%d as %s; %d files, %d bytes of data) over snapshot %s",
            top.id,
            tar_size,
            size,
            compression,
            stats.entries,
            stats.bytes,
            base.snapshot.id,
        )
        media_type = codec.MEDIA_TYPES[compression]
        if media_type == LAYER_TAR:
            return [Descriptor(LAYER_TAR, digest, size)]
        # announced: a compressed tar that announces nothing is held to GZIP_RATIO
        return [artifact.announcing(media_type, digest, size, tar_size, stats.entries)]

    def _push_layer(self, client: RegistryClient, chain: list[Layer], compression: str) -> Descriptor:
        """The blob of ``chain[0]`` (compressed with ``compression``), uploaded unless the
        registry has it."""
        layer = chain[0]
        media_type = codec.MEDIA_TYPES[compression]
        known = self._already_pushed(
            client, layer, lambda b: b.media_type == media_type and (media_type == LAYER_TAR or b.expanded)
        )
        if known is not None:
            return artifact.layer_descriptor(known)
        with self.builds.scratch() as scratch:
            digest, size, tar_size, stats = _streamed(
                client,
                scratch,
                compression,
                lambda views, tar: self.backend.export_diff(chain, views, tar),
                layer.used_bytes,
            )
        expanded = 0 if media_type == LAYER_TAR else tar_size
        exported = Blob(layer.id, digest, size, media_type, stats.entries, expanded)
        self._record_blob(exported)
        self._pushed(exported, client)
        return artifact.layer_descriptor(exported)

    def _push_block(self, client: RegistryClient, layer: Layer) -> Descriptor:
        """A raw block layer's blob (``blockimage``: its data extents, no holes),
        uploaded unless the registry has it."""
        known = self._already_pushed(client, layer, lambda b: b.media_type == BLOCK_MEDIA_TYPE)
        if known is not None:
            return Descriptor(BLOCK_MEDIA_TYPE, known.digest, known.size)
        image = self.backend.block_file(layer)
        digest, blob_size, (size, data) = client.push_stream(
            lambda body: blockimage.write_image(image, body),  # type: ignore[arg-type]
            layer.used_bytes,
        )
        exported = Blob(layer.id, digest, blob_size, BLOCK_MEDIA_TYPE, 0)
        self._record_blob(exported)
        self._pushed(exported, client)
        log.info("block layer %s pushed: %d bytes of data in an image of %d", layer.id, data, size)
        return Descriptor(BLOCK_MEDIA_TYPE, exported.digest, exported.size)

    def _already_pushed(
        self, client: RegistryClient, layer: Layer, usable: Callable[[Blob], bool]
    ) -> Blob | None:
        """A blob recorded for ``layer`` that ``usable`` accepts and the registry has (then
        counted as skipped), or None: it must be exported."""
        cancel.check()
        with self.store.read() as tx:
            known = [b for b in tx.layer_blobs(layer.id) if usable(b)]
        for blob in known:
            if client.has_blob(blob.digest):
                count_blob("push", "skipped")
                self._pushed(blob, client)
                return blob
        return None

    def _record_blob(self, exported: Blob) -> None:
        """Record ``exported`` as its layer's blob, if the layer is still here (a later
        push of the layer skips it while the registry has it)."""
        with self.store.tx() as tx:
            if tx.layer(exported.layer) is not None:
                tx.add_layer_blob(exported)

    def _import_block(
        self, client: RegistryClient, blob: Descriptor, build: Path, size: int, what: str
    ) -> Any:
        """Build a raw block layer of ``size`` bytes from its blob as it downloads: only
        its extents are written (holes stay holes), and the layer may be installed only
        once the stream's digest checks at the end."""
        name = f"layer {blob.digest[:19]}"
        with client.blob(blob.digest, blob.size) as stream:
            try:
                built = self.backend.import_block(
                    build, size, lambda fd: blockimage.restore_image(stream.read, fd, blob.size, size)
                )
            except blockimage.BadImage as e:
                stream.finish()  # a blob whose digest does not check: that is the cause
                raise BadContent(f"{what}: {name} is not a valid block image: {e}") from e
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(f"{what}: no room to build {name}") from e
                raise
            stream.finish()
        return built

    def _pushed(self, blob: Blob, client: RegistryClient) -> None:
        """The repository holds the layer's blob now: pulls from it may use the layer."""
        with self.store.tx() as tx:
            if tx.layer(blob.layer) is not None:
                tx.add_layer_blob(blob, repository=client.where)

    # ---- pull -----------------------------------------------------------------
    def pull_snapshot(self, snapshot_id: str, credentials: Credentials | None) -> Snapshot:
        """Keep a copy of an exported snapshot on this node (listed, restorable
        without the registry, until DeleteSnapshot)."""
        with self._one_pull(snapshot_id):
            return self._pull_snapshot(snapshot_id, credentials)

    @contextmanager
    def restoring(self, snapshot_id: str, credentials: Credentials | None) -> Iterator[Snapshot]:
        """An exported snapshot this node does not hold, for one restore: its
        layers are pulled (or found) and recorded as a snapshot while the restore
        runs; afterwards only the new volume keeps them. A failed restore leaves
        nothing: what it pulled is collected with the record."""
        with self._one_pull(snapshot_id):
            with self.store.read() as tx:
                kept = tx.snapshot(snapshot_id)  # a copy kept here: used, and left as it is
            snap = kept or self._pull_snapshot(snapshot_id, credentials)
            try:
                yield snap
            finally:
                if kept is None:
                    with self.store.tx() as tx:
                        tx.delete_snapshot(snapshot_id)
                        gone = tx.collect_garbage()
                    self.builds.discard(gone)

    def _pull_snapshot(self, snapshot_id: str, credentials: Credentials | None) -> Snapshot:
        ref = snapshot_reference(snapshot_id)
        if ref is None:
            raise NotFound(f"snapshot {snapshot_id[:80]!r} does not exist")
        with self.store.read() as tx:
            existing = tx.snapshot(snapshot_id)
        if existing is not None:
            return existing
        self._check_not_deleted(snapshot_id)
        client = self.client(ref.repository, credentials)
        manifest = client.pull_manifest(ref.version)
        what = f"snapshot {snapshot_id}"
        if not artifact.is_snapshot(manifest):
            raise FailedPrecondition(f"{ref} is not an overlay-csi snapshot")
        blobs = descriptors(manifest.body.get("layers"), what)
        if not blobs:
            raise BadContent(f"{what}: its manifest has no layers")
        notes = artifact.snapshot_claims(
            manifest.body.get("annotations"), what, self.backend.capabilities.artifact_fs_types
        )
        block = notes["access-type"] == BLOCK
        if block and not self.backend.capabilities.block:
            raise FailedPrecondition(
                f"{what} is of a raw block volume: this node's {self.backend.name} backend keeps none"
            )
        if block and (len(blobs) != 1 or blobs[0].media_type != BLOCK_MEDIA_TYPE):
            raise BadContent(f"{what}: a block snapshot's manifest must hold one {BLOCK_MEDIA_TYPE} layer")
        with self._pull_chain(client, blobs, what, block_size=notes["size"] if block else None) as (tx, top):
            snap = tx.add_snapshot(
                Snapshot(
                    seq=0,
                    id=snapshot_id,
                    name=snapshot_id,
                    source_volume_id=notes["source-volume"],
                    layer=top.id,
                    access_type=notes["access-type"],
                    fs_type=notes["fs-type"],
                    source_capacity=notes["source-capacity"],
                    size_bytes=notes["size"],
                    group_id="",
                    created_at=time.time(),
                    exported=manifest.digest,
                )
            )
        log.info("snapshot %s pulled: %d layers", snapshot_id, len(blobs))
        return snap

    def delete_exported(self, snapshot_id: str, credentials: Credentials | None) -> PendingDelete | None:
        """Remove an exported snapshot's artifact from its registry (a registry that
        does not allow deletes keeps it; the log says so). A registry that cannot be
        reached (refused, timed out, 5xx: UNAVAILABLE) does not fail it: the deletion
        to record is returned, to be retried once the registry is back. Refused
        credentials and everything else the registry answers still fail it."""
        if snapshot_reference(snapshot_id) is None:
            return None
        with self.store.read() as tx:
            snap = tx.snapshot(snapshot_id)
        digest = snap.exported if snap is not None and snap.exported else ""
        try:
            self.delete_manifest(snapshot_id, digest, credentials)
        except Unavailable as e:
            return PendingDelete(snapshot_id, digest, time.time(), last_error=str(e))
        return None

    def delete_manifest(self, snapshot_id: str, digest: str, credentials: Credentials | None) -> None:
        """Delete the manifest ``digest`` ("": the one the snapshot's tag names now, if any)."""
        ref = snapshot_reference(snapshot_id)
        if ref is None:
            return
        client = self.client(ref.repository, credentials)
        if not digest:  # not recorded here (taken on another node): what the tag names now
            try:
                digest = client.manifest_digest(ref.version)
            except NotFound:
                return
        client.delete_manifest(digest)

    def _check_not_deleted(self, snapshot_id: str) -> None:
        """NOT_FOUND for a snapshot deleted here whose manifest waits for its registry to go."""
        with self.store.read() as tx:
            if tx.pending_delete(snapshot_id) is not None:
                raise NotFound(
                    f"snapshot {snapshot_id[:80]!r} was deleted (its manifest goes once its registry is back)"
                )

    def describe_exported(self, snapshot_id: str, credentials: Credentials | None) -> Snapshot:
        """What an exported snapshot's manifest says of it, without pulling a layer (the
        registry snapshotter's ListSnapshots for a pre-provisioned content). NotFound when
        its registry has no such artifact."""
        ref = snapshot_reference(snapshot_id)
        if ref is None:
            raise NotFound(f"snapshot {snapshot_id[:80]!r} is not an exported snapshot")
        self._check_not_deleted(snapshot_id)
        manifest = self.client(ref.repository, credentials).pull_manifest(ref.version)
        what = f"snapshot {snapshot_id}"
        if not artifact.is_snapshot(manifest):
            raise FailedPrecondition(f"{ref} is not an overlay-csi snapshot")
        notes = artifact.snapshot_claims(
            manifest.body.get("annotations"), what, self.backend.capabilities.artifact_fs_types
        )
        return Snapshot(
            seq=0,
            id=snapshot_id,
            name=snapshot_id,
            source_volume_id=notes["source-volume"],
            layer="",
            access_type=notes["access-type"],
            fs_type=notes["fs-type"],
            source_capacity=notes["source-capacity"],
            size_bytes=notes["size"],
            group_id="",
            created_at=artifact.created_at(manifest.body.get("annotations")),
            exported=manifest.digest,
        )

    def pull_image(self, ref: Reference, credentials: Credentials | None, *, refresh: bool = False) -> Layer:
        """An OCI image's layers as a base layer named by the reference (as written):
        kept until deleted, and used without asking the registry again unless ``refresh``."""
        name = str(ref)
        with self._one_pull(name):
            with self.store.read() as tx:
                existing = tx.layer_by_name(name)
            if existing is not None and not refresh:
                return existing
            client = self.client(ref.repository, credentials)
            manifest = self._platform_manifest(client, client.pull_manifest(ref.version), name)
            blobs = descriptors(manifest.body.get("layers"), f"image {name}")
            if not blobs:
                raise FailedPrecondition(f"image {name} has no layers")
            with self._pull_chain(client, blobs, f"image {name}") as (tx, top):
                if top.name == name:
                    return top
                if top.name is not None and not top.name.startswith("retired:"):
                    raise FailedPrecondition(
                        f"image {name} is already on this node as base layer {top.name!r}; "
                        "use that name, or delete it first"
                    )
                old = tx.layer_by_name(name)
                if old is not None:  # refreshed: the old image goes once nothing uses it
                    tx.update_layer(old.id, name=f"retired:{old.id}")
                tx.update_layer(top.id, name=name)
                gone = tx.collect_garbage()
            self.builds.discard(gone)
            log.info("image %s pulled: %d layers, manifest %s", name, len(blobs), manifest.digest[:19])
            with self.store.read() as tx:
                top_now = tx.layer(top.id)
            assert top_now is not None
            return top_now

    @staticmethod
    def _platform_manifest(client: RegistryClient, manifest: Manifest, name: str) -> Manifest:
        """An index names one manifest per platform: take linux on this machine's architecture."""
        if manifest.media_type not in (OCI_INDEX, DOCKER_LIST):
            return manifest
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        items = manifest.body.get("manifests")
        if not isinstance(items, list):
            raise BadContent(f"image {name}: its index lists no manifests")
        for item in items:
            plat = item.get("platform") if isinstance(item, dict) else None
            if not isinstance(plat, dict):
                continue
            if plat.get("os") == "linux" and plat.get("architecture") == arch:
                digest = item.get("digest")
                if not isinstance(digest, str) or not DIGEST_RE.match(digest):
                    raise BadContent(f"image {name}: its index names a manifest without a sha256 digest")
                chosen = client.pull_manifest(digest)
                if chosen.media_type in (OCI_INDEX, DOCKER_LIST):
                    raise BadContent(f"image {name}: an index inside an index")
                return chosen
        raise FailedPrecondition(f"image {name} has no manifest for linux/{arch}")

    @contextmanager
    def _pull_chain(
        self, client: RegistryClient, blobs: list[Descriptor], what: str, block_size: int | None = None
    ) -> Iterator[Any]:
        """Build what is missing of the chain ``blobs`` (bottom first) in scratch,
        then yield (tx, top layer) inside the one transaction that installs it all.
        ``block_size``: the chain is one raw block layer's blob of that image size."""
        if len(blobs) > MAX_LAYERS:
            raise BadContent(f"{what}: {len(blobs)} layers (at most {MAX_LAYERS})")
        for blob in blobs:
            if block_size is not None:
                continue  # checked by the caller: one block image
            if codec.codec_of(blob.media_type) is None:
                raise FailedPrecondition(
                    f"{what}: layer {blob.digest[:19]} is a {blob.media_type[:80]!r}, not a layer media type "
                    "this driver reads (an OCI layer tar, tar+gzip or tar+zstd)"
                )
        reused: list[str] = []
        source = client.where  # host/path: the repository the caller's credentials just reached
        try:
            with self.builds.scratch() as scratch:
                plan: list[tuple[Descriptor, Layer, Path | None]] = []  # (blob, layer, build or None)
                entries: dict[str, int] = {}  # layer id -> its tar's entries, at most
                unproven: list[Descriptor] = []  # held here, but not from this repository
                parent: Layer | None = None
                need = 0
                for blob in blobs:  # what this node already has, from the bottom up
                    below = parent.id if parent else None
                    with self.store.read() as tx:
                        have = tx.layer_from_blob(blob.digest, below, source)
                        if have is None and (have := tx.layer_from_blob(blob.digest, below)) is not None:
                            unproven.append(blob)
                        if have is not None:  # pinned before the read ends: no collection in between
                            self.store.pin(have.id)
                            reused.append(have.id)
                    if have is None:
                        break
                    plan.append((blob, have, None))
                    parent = have
                missing = blobs[len(plan) :]
                # the downloads now; each layer's image once its tar is counted (_import_blob)
                # (a blob that announces its expansion is read as it arrives: no download)
                need += max((blob.size for blob in missing if artifact.announced(blob) is None), default=0)
                need += 16 * MiB * bool(missing)
                need += sum(blob.size for blob in unproven)
                with self.capacity.admit(need, what), ExitStack() as admitted:
                    for blob in unproven:  # a digest is no access: the registry serves it, or no layer
                        self._prove(client, blob, scratch)
                    for i, blob in enumerate(missing):
                        cancel.check()
                        build = scratch / f"layer{i}"
                        build.mkdir()
                        if block_size is not None:
                            built, count = self._import_block(client, blob, build, block_size, what), 0
                        else:
                            built, count = self._import_blob(
                                client, blob, build, scratch, plan, what, admitted
                            )
                        layer = self.builds.new_layer(parent, built, active=False, fs_type=built.fs_type)
                        entries[layer.id] = count
                        plan.append((blob, layer, build))
                        parent = layer
                    assert parent is not None
                    cancel.check()  # the last moment a cancelled pull may still stop
                    made = [(build, layer) for _blob, layer, build in plan if build is not None]

                    def none_gone(tx: ReadTx) -> None:
                        gone = [x.id for _b, x, build in plan if build is None and tx.layer(x.id) is None]
                        if gone:
                            raise FailedPrecondition(f"{what}: layer {gone[0]} went meanwhile; retry")

                    with self.builds.adding(made, check=none_gone) as tx:
                        for blob, layer, _build in plan:
                            count = entries.get(layer.id, 0)
                            found = Blob(layer.id, blob.digest, blob.size, blob.media_type, count)
                            tx.add_layer_blob(found, repository=source)
                        yield tx, parent
        finally:
            for layer_id in reused:
                self.store.unpin(layer_id)

    def _prove(self, client: RegistryClient, blob: Descriptor, scratch: Path) -> None:
        """Download ``blob`` from the caller's registry, checked, and drop it: a layer this
        node made from it for someone else is used only once that registry has served it."""
        with client.blob(blob.digest, blob.size) as stream:
            stream.finish()  # read, hashed and checked; nothing is kept
        log.info("blob %s served by %s: the layer made of it here is used", blob.digest[:19], client.where)

    def _import_blob(
        self,
        client: RegistryClient,
        blob: Descriptor,
        build: Path,
        scratch: Path,
        plan: list[tuple[Descriptor, Layer, Path | None]],
        what: str,
        admitted: ExitStack,
    ) -> tuple[Any, int]:
        """Build one blob's layer over the chain so far (in ``build``, installed by the
        caller); return it and its tar's entries (at most). A blob that announces what
        it expands to (our own exports) is built in one pass from the download stream;
        any other is downloaded, counted, then built (``_import_counted``). Either way
        the image is admitted (held in ``admitted`` until the pull ends) before it is
        made, and nothing is read beyond what was admitted."""
        parents = [layer for _b, layer, _p in reversed(plan)]
        name = f"layer {blob.digest[:19]}"
        kind = codec.codec_of(blob.media_type)
        assert kind is not None  # refused before (_pull_chain)
        announced = artifact.announced(blob)
        try:
            if announced is None:
                return self._import_counted(client, blob, build, scratch, parents, what, admitted)
            expanded, entries = announced
            # a compressed blob is read no further than it announces, and admitted for that;
            # an uncompressed one is its tar
            if kind == codec.NONE and expanded != blob.size:
                raise BadContent(f"{what}: {name} announces {expanded} bytes expanded, for {blob.size}")
            if entries > MAX_LAYER_ENTRIES:
                raise TooManyEntries(f"holds more than {MAX_LAYER_ENTRIES} entries (the per-layer limit)")
            admitted.enter_context(self.capacity.admit(_layer_need(expanded, entries), f"{what}: {name}"))
            with client.blob(blob.digest, blob.size) as stream:
                try:
                    raw = codec.decompressing(stream, kind)  # type: ignore[arg-type]
                    why = f"{name} expands beyond the {expanded} bytes its manifest announces"
                    reading = _Bounded(raw, expanded, why)
                    try:
                        built = self.backend.import_diff(
                            build,
                            reading,  # type: ignore[arg-type]
                            parents,
                            expanded,
                            entries=entries,
                        )
                    except TooManyEntries as e:
                        raise DiffError(f"{e}: more than its manifest announces") from e
                except _NOT_A_LAYER as e:
                    if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
                        stream.finish()  # a blob whose digest does not check: that is the cause
                    raise
                stream.finish()  # the digest checks: only now may the layer be installed
            return built, entries
        except TooManyEntries as e:
            raise ResourceExhausted(f"{what}: {name} {e}") from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"{what}: no room to build layer {blob.digest[:19]}") from e
            if isinstance(e, gzip.BadGzipFile) or e.errno in (
                errno.EOPNOTSUPP,
                errno.EPERM,
                errno.EINVAL,
                errno.EFBIG,
            ):
                raise BadContent(f"{what}: layer {blob.digest[:19]} is not a valid layer: {e}") from e
            raise
        except _NOT_A_LAYER as e:
            raise BadContent(f"{what}: layer {blob.digest[:19]} is not a valid layer: {e}") from e

    def _import_counted(
        self,
        client: RegistryClient,
        blob: Descriptor,
        build: Path,
        scratch: Path,
        parents: list[Layer],
        what: str,
        admitted: ExitStack,
    ) -> tuple[Any, int]:
        """Two passes, for a blob that announces nothing (a foreign image's): download it
        (checked), count its tar (entries, expanded bytes; a gzip at most ``GZIP_RATIO``
        times its size), admit the image that needs, and build the layer from the file,
        reading no more than was counted."""
        download = scratch / "blob"
        client.pull_blob(blob.digest, blob.size, download)
        name = f"layer {blob.digest[:19]}"
        kind = codec.codec_of(blob.media_type) or codec.NONE

        def opened(raw: BinaryIO, limit: int, why: str) -> _Bounded:
            return _Bounded(codec.decompressing(raw, kind), limit, why)

        try:
            with open(download, "rb") as raw:
                cap = blob.size * GZIP_RATIO + GZIP_SLACK if kind != codec.NONE else blob.size
                counting = opened(raw, cap, f"{name} expands beyond {GZIP_RATIO} times its size")
                stats = count_tar(counting, MAX_LAYER_ENTRIES)  # type: ignore[arg-type]
                expanded = counting.count + 4 * MiB  # what the import may read: buffering differs
                admitted.enter_context(
                    self.capacity.admit(_layer_need(expanded, stats.entries), f"{what}: {name}")
                )
                raw.seek(0)
                reading = opened(raw, expanded, f"{name} changed while it was imported")
                try:
                    built = self.backend.import_diff(
                        build,
                        reading,  # type: ignore[arg-type]
                        parents,
                        expanded,
                        entries=stats.entries,
                    )
                except TooManyEntries as e:
                    raise DiffError(f"{name} changed while it was imported: {e}") from e
                return built, stats.entries
        finally:
            download.unlink(missing_ok=True)


def _streamed(
    client: RegistryClient, scratch: Path, compression: str, export: Callable[[Path, Any], Any], expected: int
) -> tuple[str, int, int, Any]:
    """A layer tar exported (``export(views, out)``, its views mounted in ``scratch``),
    compressed and uploaded as it is written (nothing spooled): (the blob's digest,
    its size, the tar's size, what the export counted)."""
    views = scratch / "views"
    views.mkdir()

    def produce(body: Any) -> tuple[int, Any]:
        with codec.compressing(body, compression) as encoder:
            tar = _Counting(encoder)
            stats = export(views, tar)
        return tar.size, stats

    digest, size, (tar_size, stats) = client.push_stream(produce, expected)
    return digest, size, tar_size, stats
