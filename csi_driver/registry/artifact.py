"""The OCI artifact an exported snapshot is: an image manifest of ``ARTIFACT_TYPE``
with the empty config, one layer descriptor per layer of the snapshot's chain (bottom
first), and annotations that say what the snapshot is. Written and read (untrusted)
here; ``engine/transfers.py`` moves it to and from registries.

A layer descriptor of our own exports may announce what its tar expands to and how
many entries it holds (``LAYER_EXPANDED``, ``LAYER_ENTRIES``), so that a restore can
size the layer's image before reading the blob and build it from the download
stream. Untrusted: the import reads no more than they announce (DATA_LOSS beyond).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Collection, Sequence
from typing import Any

from csi_driver.registry import codec
from csi_driver.registry.auth import BadContent
from csi_driver.registry.client import OCI_MANIFEST, Descriptor, Manifest
from csi_driver.store import Blob, Snapshot

ARTIFACT_TYPE = "application/vnd.overlay-csi.snapshot.v1"
LAYER_TAR = codec.LAYER_TAR
EMPTY_CONFIG = Descriptor(
    "application/vnd.oci.empty.v1+json",
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",  # b"{}"
    2,
)
EMPTY_CONFIG_BYTES = b"{}"
NOTE = "dev.overlay-csi.snapshot."  # the manifest annotations' prefix
LAYER_EXPANDED = "dev.overlay-csi.layer.expanded-size"
LAYER_ENTRIES = "dev.overlay-csi.layer.entries"
CREATED = "org.opencontainers.image.created"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def snapshot_manifest(snap: Snapshot, layers: Sequence[Descriptor]) -> dict[str, Any]:
    """The manifest of ``snap`` exported as ``layers`` (bottom first)."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.as_json(),
        "layers": [x.as_json() for x in layers],
        "annotations": {
            NOTE + "source-volume": snap.source_volume_id,
            NOTE + "access-type": snap.access_type,
            NOTE + "fs-type": snap.fs_type,
            NOTE + "source-capacity": str(snap.source_capacity),
            NOTE + "size": str(snap.size_bytes),
            CREATED: time.strftime(_TIME_FORMAT, time.gmtime(snap.created_at)),
        },
    }


def is_snapshot(manifest: Manifest) -> bool:
    """Whether ``manifest`` is an exported snapshot's (not an image's, nor anything else)."""
    return manifest.media_type == OCI_MANIFEST and manifest.body.get("artifactType") == ARTIFACT_TYPE


def snapshot_claims(raw: Any, what: str, fs_types: Collection[str]) -> dict[str, Any]:
    """What an exported snapshot's manifest annotations (``raw``, untrusted) say of it,
    checked: source-volume, access-type, fs-type (for a mount volume's, one of ``fs_types``:
    what this node's backend can import), source-capacity and size; ``BadContent`` otherwise."""
    if not isinstance(raw, dict):
        raise BadContent(f"{what}: its manifest has no annotations")
    out: dict[str, Any] = {}
    source = raw.get(NOTE + "source-volume", "")
    if not isinstance(source, str) or not 0 < len(source) <= 128:
        raise BadContent(f"{what}: no valid source volume in its manifest")
    out["source-volume"] = source
    access_type = raw.get(NOTE + "access-type", "mount")  # absent: an export made before block ones
    if access_type not in ("mount", "block"):
        raise BadContent(f"{what}: access type {str(access_type)[:20]!r} in its manifest")
    out["access-type"] = access_type
    fs_type = raw.get(NOTE + "fs-type", "")
    if fs_type not in (fs_types if access_type == "mount" else ("block",)):
        raise BadContent(f"{what}: file system {str(fs_type)[:20]!r} in its manifest")
    out["fs-type"] = fs_type
    for key in ("source-capacity", "size"):
        value = raw.get(NOTE + key, "")
        if not isinstance(value, str) or not value.isdigit() or len(value) > 18:
            raise BadContent(f"{what}: no valid {key} in its manifest")
        out[key] = int(value)
    if out["source-capacity"] <= 0:
        raise BadContent(f"{what}: a source capacity of 0 in its manifest")
    return out


def created_at(raw: Any) -> float:
    """The manifest's creation time (annotations ``raw``, untrusted): 0 when absent or malformed."""
    text = raw.get(CREATED, "") if isinstance(raw, dict) else ""
    try:
        return float(calendar.timegm(time.strptime(str(text)[:32], _TIME_FORMAT)))
    except ValueError:
        return 0.0


def announced(blob: Descriptor) -> tuple[int, int] | None:
    """What a layer descriptor announces (untrusted): (expanded bytes, entries), or None
    when it does not announce both as numbers."""
    expanded = blob.annotations.get(LAYER_EXPANDED, "")
    entries = blob.annotations.get(LAYER_ENTRIES, "")
    if not (expanded.isdecimal() and entries.isdecimal() and len(expanded) <= 18 and len(entries) <= 18):
        return None
    return int(expanded), int(entries)


def announcing(media_type: str, digest: str, size: int, expanded: int, entries: int) -> Descriptor:
    """A layer descriptor announcing what its tar expands to and its entries."""
    return Descriptor(media_type, digest, size, {LAYER_EXPANDED: str(expanded), LAYER_ENTRIES: str(entries)})


def layer_descriptor(blob: Blob) -> Descriptor:
    """A layer blob's descriptor, announcing its expansion when its entries are known."""
    if not blob.entries:
        return Descriptor(blob.media_type, blob.digest, blob.size, {})
    # a compressed blob's expansion is recorded; a tar is its size
    return announcing(blob.media_type, blob.digest, blob.size, blob.expanded or blob.size, blob.entries)
