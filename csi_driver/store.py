"""Transactional metadata store (SQLite, WAL): the source of truth for layers,
volumes, snapshots, staging and publications.

Every change is one short transaction (``with store.tx() as tx``); long work
(mkfs, copies, mounts) happens outside it. Reads that change nothing use
``with store.read() as r``: a snapshot on the calling thread's own connection that
never waits for a writer. Reference counts are derived from rows, so layer
reclaim survives restarts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from csi_driver.errors import ResourceExhausted
from csi_driver.space_reserve import SpaceReserve

MiB = 1 << 20
SQLITE_FULL = 13  # sqlite3's result code for a full disk
MAX_ERROR = 500  # characters of a pending deletion's last error kept
LAYER_LOG = 1024  # write transactions whose changed layers ``layer_changes`` can tell

SCHEMA_VERSION = 6  # 3: snapshots.exported and layer_blobs (registries); 4: layer_blob_sources
# (the repositories a blob was pulled from or pushed to); 5: pending_deletes (exported snapshots'
# manifests to delete once their registry is back) and layer_blobs.entries; 6: layer_blobs.expanded
# (a compressed blob's tar size); older drivers refuse it

# Layers: the graph and what the engine accounts (layers), apart from what the
# layer backend keeps for itself (layer_storage, one row per layer); the view
# joins them into the records the engine and the backend read.
_LAYERS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id TEXT PRIMARY KEY,
    parent TEXT REFERENCES layers(id),
    name TEXT UNIQUE,
    active INTEGER NOT NULL,
    fs_type TEXT NOT NULL,
    depth INTEGER NOT NULL,
    image_bytes INTEGER NOT NULL,
    used_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""
_LAYERS = (
    _LAYERS_TABLE.format(name="layers")
    + """
CREATE TABLE IF NOT EXISTS layer_storage (
    layer TEXT PRIMARY KEY REFERENCES layers(id) ON DELETE CASCADE,
    link TEXT NOT NULL UNIQUE,
    base_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
"""
)
_LAYER_VIEW = """
CREATE VIEW IF NOT EXISTS layer_rows AS
    SELECT l.id, l.parent, s.link, l.name, l.active, l.fs_type, l.depth, l.image_bytes,
           l.used_bytes, l.created_at, s.base_bytes
    FROM layers l JOIN layer_storage s ON s.layer = l.id;
"""
_STORAGE_FIELDS = ("link", "base_bytes")

# Schema 1 kept the backend's fields in the layers table itself.
_FROM_V1 = (
    """
DROP VIEW IF EXISTS layer_rows;
INSERT INTO layer_storage (layer, link, base_bytes) SELECT id, link, base_bytes FROM layers;
"""
    + _LAYERS_TABLE.format(name="layers_v2")
    + """
INSERT INTO layers_v2 SELECT id, parent, name, active, fs_type, depth, image_bytes, used_bytes, created_at
    FROM layers;
DROP TABLE layers;
ALTER TABLE layers_v2 RENAME TO layers;
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
UPDATE meta SET value='2' WHERE key='schema_version';
"""
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    capacity_bytes INTEGER NOT NULL,
    upper TEXT NOT NULL REFERENCES layers(id),
    access_type TEXT NOT NULL,
    fs_type TEXT NOT NULL,
    source_kind TEXT NOT NULL DEFAULT '',
    source_id TEXT NOT NULL DEFAULT '',
    parameters TEXT NOT NULL DEFAULT '{}',
    mutable TEXT NOT NULL DEFAULT '{}',
    ephemeral INTEGER NOT NULL DEFAULT 0,
    staging_path TEXT,
    stage_options TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS publications (
    volume_id TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    target_path TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (volume_id, target_path)
);
CREATE TABLE IF NOT EXISTS attachments (
    volume_id TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    PRIMARY KEY (volume_id, node_id)
);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    source_volume_id TEXT NOT NULL,
    layer TEXT NOT NULL REFERENCES layers(id),
    access_type TEXT NOT NULL,
    fs_type TEXT NOT NULL,
    source_capacity INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    group_id TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    exported TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    members TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS volumes_layer ON volumes(upper);
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer);
CREATE INDEX IF NOT EXISTS snapshots_source ON snapshots(source_volume_id);
CREATE INDEX IF NOT EXISTS volumes_staging ON volumes(staging_path);
CREATE INDEX IF NOT EXISTS publications_target ON publications(target_path);
CREATE TABLE IF NOT EXISTS layer_blobs (
    layer TEXT NOT NULL REFERENCES layers(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    entries INTEGER NOT NULL DEFAULT 0,
    expanded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (layer, digest)
);
CREATE INDEX IF NOT EXISTS layer_blobs_digest ON layer_blobs(digest);
CREATE TABLE IF NOT EXISTS layer_blob_sources (
    layer TEXT NOT NULL,
    digest TEXT NOT NULL,
    repository TEXT NOT NULL,
    PRIMARY KEY (digest, repository, layer),
    FOREIGN KEY (layer, digest) REFERENCES layer_blobs(layer, digest) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS layer_blob_sources_layer ON layer_blob_sources(layer, digest);
CREATE TABLE IF NOT EXISTS pending_deletes (
    snapshot_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL DEFAULT '',
    recorded_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class Layer:
    id: str
    parent: str | None
    link: str
    name: str | None
    active: int
    fs_type: str
    depth: int
    image_bytes: int
    used_bytes: int  # committed: the data it holds; active: 0
    created_at: float
    base_bytes: int = 0  # what the empty file system itself uses (journal, tables)


@dataclass(frozen=True)
class Volume:
    seq: int
    id: str
    name: str
    capacity_bytes: int
    upper: str
    access_type: str
    fs_type: str
    source_kind: str
    source_id: str
    parameters: dict[str, str]
    mutable: dict[str, str]
    ephemeral: bool
    staging_path: str | None
    stage_options: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Publication:
    volume_id: str
    target_path: str
    readonly: bool
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    seq: int
    id: str
    name: str
    source_volume_id: str
    layer: str
    access_type: str
    fs_type: str
    source_capacity: int
    size_bytes: int
    group_id: str
    created_at: float
    exported: str = ""  # an exported snapshot's manifest digest, once the registry holds it


@dataclass(frozen=True)
class PendingDelete:
    """An exported snapshot deleted while its registry could not be reached: its manifest
    is deleted by a retry once the registry is back. No credentials are kept here."""

    snapshot_id: str  # the artifact's reference (REPOSITORY:snap-...)
    digest: str  # the manifest's digest, when known (else what the tag names at the retry)
    recorded_at: float
    attempts: int = 0  # retries so far
    last_error: str = ""


@dataclass(frozen=True)
class Blob:
    """A registry blob that holds a layer: an OCI layer tar, maybe compressed."""

    layer: str
    digest: str
    size: int
    media_type: str
    entries: int = 0  # the tar's entries, at most (an export's count, or what a pull checked); 0: unknown
    expanded: int = 0  # the tar's size (a compressed blob's, as exported); 0: unknown or uncompressed


@dataclass(frozen=True)
class Census:
    """What the store holds, counted by state in one read (the metrics' node figures)."""

    volumes: int
    provisioned_bytes: int  # the sum of the volumes' capacities
    published: int  # volumes with at least one publication
    staged: int  # volumes staged and not published
    snapshots: int
    orphan_snapshots: int  # snapshots whose source volume is gone
    snapshot_bytes: int  # the sum of the snapshots' size_bytes
    layers: dict[str, tuple[int, int]]  # "active", "committed" or "base" -> (count, deepest depth)
    pending_deletes: int
    staging_paths: list[str]
    publication_targets: list[str]


@dataclass(frozen=True)
class LayerDependents:
    """Who stands on a layer: its children, the volume it is the upper of, and every volume
    and snapshot whose chain holds it (the layer itself or one stacked on it)."""

    children: list[str]
    owner: str | None
    volumes: list[str]
    snapshots: list[str]


@dataclass(frozen=True)
class StoreSummary:
    """What ``summarize`` reads of a store without opening it for writing (``doctor``)."""

    schema_version: str
    volumes: int
    provisioned_bytes: int
    snapshots: int
    layers: int
    integrity: str  # "ok", or what SQLite's quick_check found


_LAYER_COLUMNS = ", ".join(f.name for f in fields(Layer))

# Walk parent links from the top; the guard on n ends a (corrupt) cycle instead of looping forever.
_CHAIN_SQL = f"""
WITH RECURSIVE chain AS (
    SELECT 0 AS n, * FROM layer_rows WHERE id=?
    UNION ALL
    SELECT c.n + 1, l.* FROM chain c JOIN layer_rows l ON l.id=c.parent
    WHERE c.n < (SELECT COUNT(*) FROM layers)
)
SELECT {_LAYER_COLUMNS} FROM chain ORDER BY n
"""


def _volume(row: sqlite3.Row) -> Volume:
    d = dict(row)
    for key in ("parameters", "mutable", "stage_options"):
        d[key] = {} if d[key] == "{}" else json.loads(d[key])  # most are empty: ListVolumes of thousands
    d["ephemeral"] = bool(d["ephemeral"])
    return Volume(**d)


def _publication(row: sqlite3.Row) -> Publication:
    d = dict(row)
    d["readonly"] = bool(d["readonly"])
    d["options"] = json.loads(d["options"])
    return Publication(**d)


class ReadTx:
    """Queries inside one open transaction: what ``Store.read()`` yields."""

    def __init__(self, conn: sqlite3.Connection, pinned: Counter[str] | None = None) -> None:
        self.c = conn
        self.pinned = pinned if pinned is not None else Counter()

    # ---- layers -------------------------------------------------------
    def layer(self, layer_id: str) -> Layer | None:
        row = self.c.execute("SELECT * FROM layer_rows WHERE id=?", (layer_id,)).fetchone()
        return Layer(**dict(row)) if row else None

    def layer_by_name(self, name: str) -> Layer | None:
        row = self.c.execute("SELECT * FROM layer_rows WHERE name=?", (name,)).fetchone()
        return Layer(**dict(row)) if row else None

    def layers(self) -> list[Layer]:
        return [Layer(**dict(r)) for r in self.c.execute("SELECT * FROM layer_rows ORDER BY created_at")]

    def has_layers(self) -> bool:
        return self.c.execute("SELECT 1 FROM layers LIMIT 1").fetchone() is not None

    def layer_sizes(self, ids: Collection[str] | None = None) -> dict[str, tuple[bool, int]]:
        """id -> (active, image_bytes) of every layer, or of those of ``ids`` that exist."""
        if ids is None:
            rows = self.c.execute("SELECT id, active, image_bytes FROM layers")
        else:
            marks = ",".join("?" * len(ids))
            rows = self.c.execute(
                f"SELECT id, active, image_bytes FROM layers WHERE id IN ({marks})", tuple(ids)
            )
        return {r[0]: (bool(r[1]), int(r[2])) for r in rows}

    def chain(self, top: str | None) -> list[Layer]:
        """The layer stack under ``top``, nearest (top) first, in one query."""
        if not top:
            return []
        rows = self.c.execute(_CHAIN_SQL, (top,)).fetchall()
        out = [Layer(**dict(r)) for r in rows]
        bottom = out[-1].parent if out else top
        if bottom is not None:
            if any(x.id == bottom for x in out):
                raise LookupError(f"layer chain under {top} loops back to {bottom}")
            raise LookupError(f"layer {bottom} missing from store")
        return out

    def unreferenced_layers(self) -> list[Layer]:
        """Unnamed (or retired base) layers nothing points at (volume, snapshot or child)."""
        rows = self.c.execute(
            "SELECT * FROM layer_rows l WHERE (l.name IS NULL OR l.name LIKE 'retired:%')"
            " AND NOT EXISTS (SELECT 1 FROM volumes v WHERE v.upper=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.layer=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent=l.id)"
        )
        return [Layer(**dict(r)) for r in rows if not self.pinned[r["id"]]]

    def layer_users(self, layer_id: str) -> int:
        row = self.c.execute(
            "SELECT (SELECT COUNT(*) FROM volumes WHERE upper=?)"
            " + (SELECT COUNT(*) FROM snapshots WHERE layer=?)"
            " + (SELECT COUNT(*) FROM layers WHERE parent=?)",
            (layer_id, layer_id, layer_id),
        ).fetchone()
        return int(row[0])

    def dependents(self, layer_id: str) -> LayerDependents:
        above = "WITH RECURSIVE d(id) AS (SELECT ? UNION SELECT l.id FROM layers l JOIN d ON l.parent = d.id)"
        volumes = self.c.execute(
            above + " SELECT v.id FROM volumes v WHERE v.upper IN d ORDER BY v.seq", (layer_id,)
        )
        snapshots = self.c.execute(
            above + " SELECT s.id FROM snapshots s WHERE s.layer IN d ORDER BY s.seq", (layer_id,)
        )
        children = self.c.execute("SELECT id FROM layers WHERE parent=?", (layer_id,))
        owner = self.c.execute("SELECT id FROM volumes WHERE upper=?", (layer_id,)).fetchone()
        return LayerDependents(
            children=[r[0] for r in children],
            owner=owner[0] if owner else None,
            volumes=[r[0] for r in volumes],
            snapshots=[r[0] for r in snapshots],
        )

    # ---- registry blobs -----------------------------------------------
    def layer_blobs(self, layer_id: str) -> list[Blob]:
        """The registry blobs known to hold this layer (what it was pulled from or pushed as)."""
        rows = self.c.execute("SELECT * FROM layer_blobs WHERE layer=? ORDER BY digest", (layer_id,))
        return [Blob(**dict(r)) for r in rows]

    def layer_from_blob(self, digest: str, parent: str | None, repository: str | None = None) -> Layer | None:
        """The committed layer a blob made over ``parent`` (None: at the bottom); with
        ``repository`` (``host/path``), only one this node pulled from or pushed to it."""
        if repository is None:
            sql = "SELECT l.* FROM layer_rows l JOIN layer_blobs b ON b.layer=l.id WHERE b.digest=?"
            args: tuple[Any, ...] = (digest, parent)
        else:
            sql = (
                "SELECT l.* FROM layer_rows l JOIN layer_blob_sources b ON b.layer=l.id"
                " WHERE b.digest=? AND b.repository=?"
            )
            args = (digest, repository, parent)
        row = self.c.execute(
            sql + " AND l.parent IS ? AND NOT l.active ORDER BY l.created_at LIMIT 1", args
        ).fetchone()
        return Layer(**dict(row)) if row else None

    def blob_sources(self, layer_id: str) -> list[tuple[str, str]]:
        """(digest, repository) of every repository this node got the layer's blobs from or put them in."""
        rows = self.c.execute(
            "SELECT digest, repository FROM layer_blob_sources WHERE layer=? ORDER BY digest, repository",
            (layer_id,),
        )
        return [(r[0], r[1]) for r in rows]

    # ---- volumes ------------------------------------------------------
    def volume(self, volume_id: str) -> Volume | None:
        row = self.c.execute("SELECT * FROM volumes WHERE id=?", (volume_id,)).fetchone()
        return _volume(row) if row else None

    def volume_by_name(self, name: str) -> Volume | None:
        row = self.c.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
        return _volume(row) if row else None

    def volumes(self, after_seq: int = 0, limit: int | None = None) -> list[Volume]:
        sql = "SELECT * FROM volumes WHERE seq>? ORDER BY seq"
        args: tuple[Any, ...] = (after_seq,)
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [_volume(r) for r in self.c.execute(sql, args)]

    def count_staged(self, except_id: str = "") -> int:
        row = self.c.execute(
            "SELECT COUNT(*) FROM volumes WHERE staging_path IS NOT NULL AND id!=?", (except_id,)
        ).fetchone()
        return int(row[0])

    def count_attached(self, node_id: str, except_id: str = "") -> int:
        row = self.c.execute(
            "SELECT COUNT(*) FROM attachments WHERE node_id=? AND volume_id!=?", (node_id, except_id)
        ).fetchone()
        return int(row[0])

    # ---- publications -------------------------------------------------
    def publications(self, volume_id: str | None = None) -> list[Publication]:
        if volume_id is None:
            rows = self.c.execute("SELECT * FROM publications ORDER BY volume_id, target_path")
        else:
            rows = self.c.execute(
                "SELECT * FROM publications WHERE volume_id=? ORDER BY target_path", (volume_id,)
            )
        return [_publication(r) for r in rows]

    def paths_below(self, path: str) -> list[tuple[str, str]]:
        """(volume id, path) of staging paths and publication targets strictly below
        ``path`` (two index range scans: "/" sorts just before "0")."""
        low, high = path.rstrip("/") + "/", path.rstrip("/") + "0"
        rows = self.c.execute(
            "SELECT id, staging_path FROM volumes WHERE staging_path >= ? AND staging_path < ?"
            " UNION ALL SELECT volume_id, target_path FROM publications"
            " WHERE target_path >= ? AND target_path < ?",
            (low, high, low, high),
        )
        return [(r[0], r[1]) for r in rows]

    def publication_at(self, target_path: str) -> Publication | None:
        row = self.c.execute("SELECT * FROM publications WHERE target_path=?", (target_path,)).fetchone()
        return _publication(row) if row else None

    # ---- controller attachments (ControllerPublishVolume) --------------
    def attachment(self, volume_id: str, node_id: str) -> bool | None:
        """The readonly flag of the volume's attachment to the node, or None."""
        row = self.c.execute(
            "SELECT readonly FROM attachments WHERE volume_id=? AND node_id=?", (volume_id, node_id)
        ).fetchone()
        return None if row is None else bool(row[0])

    def attached_volume_ids(self) -> list[str]:
        return [r[0] for r in self.c.execute("SELECT DISTINCT volume_id FROM attachments")]

    def attached_nodes(self, volume_id: str) -> list[str]:
        rows = self.c.execute("SELECT node_id FROM attachments WHERE volume_id=?", (volume_id,))
        return [r[0] for r in rows]

    # ---- snapshots ----------------------------------------------------
    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        row = self.c.execute("SELECT * FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return Snapshot(**dict(row)) if row else None

    def snapshot_by_name(self, name: str) -> Snapshot | None:
        row = self.c.execute("SELECT * FROM snapshots WHERE name=?", (name,)).fetchone()
        return Snapshot(**dict(row)) if row else None

    def snapshots(
        self, after_seq: int = 0, limit: int | None = None, source_volume_id: str | None = None
    ) -> list[Snapshot]:
        sql = "SELECT * FROM snapshots WHERE seq>?"
        args: tuple[Any, ...] = (after_seq,)
        if source_volume_id is not None:
            sql += " AND source_volume_id=?"
            args += (source_volume_id,)
        sql += " ORDER BY seq"
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [Snapshot(**dict(r)) for r in self.c.execute(sql, args)]

    # ---- exported snapshots' deletions that wait for their registry ----
    def pending_delete(self, snapshot_id: str) -> PendingDelete | None:
        row = self.c.execute("SELECT * FROM pending_deletes WHERE snapshot_id=?", (snapshot_id,)).fetchone()
        return PendingDelete(**dict(row)) if row else None

    def pending_deletes(self) -> list[PendingDelete]:
        rows = self.c.execute("SELECT * FROM pending_deletes ORDER BY recorded_at, snapshot_id")
        return [PendingDelete(**dict(r)) for r in rows]

    # ---- groups -------------------------------------------------------
    def group(self, group_id: str) -> dict[str, Any] | None:
        row = self.c.execute("SELECT * FROM groups WHERE id=?", (group_id,)).fetchone()
        return _group(row) if row else None

    def group_by_name(self, name: str) -> dict[str, Any] | None:
        row = self.c.execute("SELECT * FROM groups WHERE name=?", (name,)).fetchone()
        return _group(row) if row else None

    # ---- figures ------------------------------------------------------
    def census(self) -> Census:
        """Aggregate queries only: no row of a volume or snapshot is read into Python."""
        vol = self.c.execute(
            "SELECT COUNT(*), COALESCE(SUM(capacity_bytes), 0),"
            " COALESCE(SUM(EXISTS (SELECT 1 FROM publications p WHERE p.volume_id = v.id)), 0),"
            " COALESCE(SUM(staging_path IS NOT NULL"
            "  AND NOT EXISTS (SELECT 1 FROM publications p WHERE p.volume_id = v.id)), 0)"
            " FROM volumes v"
        ).fetchone()
        snaps = self.c.execute(
            "SELECT COUNT(*), COALESCE(SUM(NOT EXISTS"
            " (SELECT 1 FROM volumes v WHERE v.id = s.source_volume_id)), 0),"
            " COALESCE(SUM(size_bytes), 0) FROM snapshots s"
        ).fetchone()
        layers = self.c.execute(
            "SELECT CASE WHEN active THEN 'active' WHEN name IS NOT NULL THEN 'base'"
            " ELSE 'committed' END, COUNT(*), COALESCE(MAX(depth), 0) FROM layers GROUP BY 1"
        )
        staging = self.c.execute("SELECT staging_path FROM volumes WHERE staging_path IS NOT NULL")
        targets = self.c.execute("SELECT target_path FROM publications")
        pending = self.c.execute("SELECT COUNT(*) FROM pending_deletes").fetchone()
        return Census(
            volumes=int(vol[0]),
            provisioned_bytes=int(vol[1]),
            published=int(vol[2]),
            staged=int(vol[3]),
            snapshots=int(snaps[0]),
            orphan_snapshots=int(snaps[1]),
            snapshot_bytes=int(snaps[2]),
            layers={state: (int(n), int(depth)) for state, n, depth in layers},
            pending_deletes=int(pending[0]),
            staging_paths=[r[0] for r in staging],
            publication_targets=[r[0] for r in targets],
        )


class Tx(ReadTx):
    """Queries and changes inside one open write transaction."""

    def __init__(self, conn: sqlite3.Connection, pinned: Counter[str] | None = None) -> None:
        super().__init__(conn, pinned)
        self.changed_layers: set[str] = set()  # added, changed or deleted rows (``Store.layer_changes``)

    # ---- layers -------------------------------------------------------
    def add_layer(self, layer: Layer) -> None:
        self.c.execute(
            "INSERT INTO layers (id,parent,name,active,fs_type,depth,image_bytes,used_bytes,created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (
                layer.id,
                layer.parent,
                layer.name,
                layer.active,
                layer.fs_type,
                layer.depth,
                layer.image_bytes,
                layer.used_bytes,
                layer.created_at,
            ),
        )
        self.c.execute(
            "INSERT INTO layer_storage (layer,link,base_bytes) VALUES (?,?,?)",
            (layer.id, layer.link, layer.base_bytes),
        )
        self.changed_layers.add(layer.id)

    def collect_garbage(self) -> list[Layer]:
        """Delete every unreferenced unnamed layer row, transitively; return them."""
        gone: list[Layer] = []
        while batch := self.unreferenced_layers():
            for layer in batch:
                self.c.execute("DELETE FROM layers WHERE id=?", (layer.id,))
                self.changed_layers.add(layer.id)
            gone.extend(batch)
        return gone

    def update_layer(self, layer_id: str, **changes: Any) -> None:
        storage = {k: v for k, v in changes.items() if k in _STORAGE_FIELDS}
        graph = {k: v for k, v in changes.items() if k not in _STORAGE_FIELDS}
        for table, key, cols in (("layers", "id", graph), ("layer_storage", "layer", storage)):
            if cols:
                sets = ", ".join(f"{k}=?" for k in cols)
                self.c.execute(f"UPDATE {table} SET {sets} WHERE {key}=?", (*cols.values(), layer_id))
        self.changed_layers.add(layer_id)

    def add_layer_blob(self, blob: Blob, repository: str = "") -> None:
        """Record that ``blob`` holds the layer; with ``repository`` (``host/path``), that
        this node pulled it from there (the registry served it) or pushed it there."""
        self.c.execute(
            "INSERT INTO layer_blobs (layer,digest,size,media_type,entries,expanded) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT (layer,digest) DO UPDATE SET entries=excluded.entries, expanded=excluded.expanded"
            " WHERE layer_blobs.entries=0",
            (blob.layer, blob.digest, blob.size, blob.media_type, blob.entries, blob.expanded),
        )
        if repository:
            self.c.execute(
                "INSERT OR IGNORE INTO layer_blob_sources (layer,digest,repository) VALUES (?,?,?)",
                (blob.layer, blob.digest, repository),
            )

    # ---- volumes ------------------------------------------------------
    def add_volume(self, v: Volume) -> Volume:
        cur = self.c.execute(
            "INSERT INTO volumes (id,name,capacity_bytes,upper,access_type,fs_type,source_kind,"
            "source_id,parameters,mutable,ephemeral,staging_path,stage_options,created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                v.id,
                v.name,
                v.capacity_bytes,
                v.upper,
                v.access_type,
                v.fs_type,
                v.source_kind,
                v.source_id,
                json.dumps(v.parameters, sort_keys=True),
                json.dumps(v.mutable, sort_keys=True),
                int(v.ephemeral),
                v.staging_path,
                json.dumps(v.stage_options, sort_keys=True),
                v.created_at,
            ),
        )
        return _volume(self.c.execute("SELECT * FROM volumes WHERE seq=?", (cur.lastrowid,)).fetchone())

    def update_volume(self, volume_id: str, **changes: Any) -> None:
        cols = []
        vals: list[Any] = []
        for key, value in changes.items():
            if key in ("parameters", "mutable", "stage_options"):
                value = json.dumps(value, sort_keys=True)
            cols.append(f"{key}=?")
            vals.append(value)
        self.c.execute(f"UPDATE volumes SET {', '.join(cols)} WHERE id=?", (*vals, volume_id))

    def delete_volume(self, volume_id: str) -> None:
        self.c.execute("DELETE FROM publications WHERE volume_id=?", (volume_id,))
        self.c.execute("DELETE FROM attachments WHERE volume_id=?", (volume_id,))
        self.c.execute("DELETE FROM volumes WHERE id=?", (volume_id,))

    # ---- publications -------------------------------------------------
    def add_publication(self, p: Publication) -> None:
        self.c.execute(
            "INSERT OR REPLACE INTO publications (volume_id,target_path,readonly,options) VALUES (?,?,?,?)",
            (p.volume_id, p.target_path, int(p.readonly), json.dumps(p.options, sort_keys=True)),
        )

    def delete_publication(self, volume_id: str, target_path: str) -> None:
        self.c.execute(
            "DELETE FROM publications WHERE volume_id=? AND target_path=?", (volume_id, target_path)
        )

    # ---- controller attachments (ControllerPublishVolume) --------------
    def attach(self, volume_id: str, node_id: str, readonly: bool) -> None:
        self.c.execute(
            "INSERT OR REPLACE INTO attachments (volume_id,node_id,readonly) VALUES (?,?,?)",
            (volume_id, node_id, int(readonly)),
        )

    def detach(self, volume_id: str, node_id: str) -> None:
        self.c.execute("DELETE FROM attachments WHERE volume_id=? AND node_id=?", (volume_id, node_id))

    # ---- snapshots ----------------------------------------------------
    def add_snapshot(self, s: Snapshot) -> Snapshot:
        cur = self.c.execute(
            "INSERT INTO snapshots (id,name,source_volume_id,layer,access_type,fs_type,"
            "source_capacity,size_bytes,group_id,created_at,exported) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                s.id,
                s.name,
                s.source_volume_id,
                s.layer,
                s.access_type,
                s.fs_type,
                s.source_capacity,
                s.size_bytes,
                s.group_id,
                s.created_at,
                s.exported,
            ),
        )
        row = self.c.execute("SELECT * FROM snapshots WHERE seq=?", (cur.lastrowid,)).fetchone()
        return Snapshot(**dict(row))

    def set_exported(self, snapshot_id: str, manifest_digest: str) -> None:
        self.c.execute("UPDATE snapshots SET exported=? WHERE id=?", (manifest_digest, snapshot_id))

    def repoint_snapshot(self, snapshot_id: str, layer_id: str) -> None:
        """Let the snapshot use ``layer_id`` (a flattened copy of its chain's view)."""
        self.c.execute("UPDATE snapshots SET layer=? WHERE id=?", (layer_id, snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.c.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

    # ---- exported snapshots' deletions that wait for their registry ----
    def add_pending_delete(self, p: PendingDelete) -> None:
        """Record it, unless one for the snapshot is recorded already (that one stays)."""
        self.c.execute(
            "INSERT OR IGNORE INTO pending_deletes (snapshot_id,digest,recorded_at,attempts,last_error)"
            " VALUES (?,?,?,?,?)",
            (p.snapshot_id, p.digest, p.recorded_at, p.attempts, p.last_error[:MAX_ERROR]),
        )

    def retried_delete(self, snapshot_id: str, error: str) -> None:
        """One more retry of a pending deletion failed, with ``error``."""
        self.c.execute(
            "UPDATE pending_deletes SET attempts=attempts+1, last_error=? WHERE snapshot_id=?",
            (error[:MAX_ERROR], snapshot_id),
        )

    def delete_pending_delete(self, snapshot_id: str) -> None:
        self.c.execute("DELETE FROM pending_deletes WHERE snapshot_id=?", (snapshot_id,))

    # ---- groups -------------------------------------------------------
    def add_group(self, group_id: str, name: str, members: list[str]) -> None:
        self.c.execute(
            "INSERT INTO groups (id,name,members,created_at) VALUES (?,?,?,?)",
            (group_id, name, json.dumps(members), time.time()),
        )

    def delete_group(self, group_id: str) -> None:
        self.c.execute("DELETE FROM groups WHERE id=?", (group_id,))


def _group(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["members"] = json.loads(d["members"])
    return d


class _ReaderHandle:
    """Lives in one thread's local storage: its end (with the thread) closes that thread's reader."""


class Store:
    """One SQLite database (WAL). A lock serialises writers so transactions stay short;
    readers take no lock: each thread reads on its own query-only connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        # layers an operation in flight installed but has not yet referenced: never garbage
        self.pinned: Counter[str] = Counter()
        self._local = threading.local()
        self._readers: set[sqlite3.Connection] = set()
        self._readers_lock = threading.RLock()  # reentrant: a reader's finaliser may run under it
        self._closed = False
        # the layer rows each write transaction changed, newest last: what ``layer_changes`` answers
        self._layer_log: deque[tuple[int, frozenset[str]]] = deque(maxlen=LAYER_LOG)
        self._layer_generation = 0
        self._layer_log_floor = 0  # changes up to this generation are no longer in the log
        self._data_version = -1  # the writer's PRAGMA data_version: changes on another process's commit
        self.reserve = SpaceReserve(path.with_name(path.name + ".reserve"))
        self.reserve.restore()
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        """This thread's reader connection, opened on first use."""
        if self._closed:
            raise sqlite3.ProgrammingError("store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._connect()
        conn.execute("PRAGMA query_only=ON")
        readers, lock = self._readers, self._readers_lock
        with lock:
            if self._closed:
                conn.close()
                raise sqlite3.ProgrammingError("store is closed")
            readers.add(conn)

        def drop() -> None:
            with lock:
                readers.discard(conn)
            conn.close()

        handle = _ReaderHandle()
        weakref.finalize(handle, drop)  # refers to neither the Store nor the handle
        self._local.handle, self._local.conn = handle, conn
        return conn

    def _migrate(self) -> None:
        with self._lock:
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(layers)")}
            if "link" in columns:  # schema 1: move the backend's fields to layer_storage
                self._conn.execute("PRAGMA foreign_keys=OFF")  # the table is rebuilt under its references
                try:
                    self._conn.executescript("BEGIN IMMEDIATE;" + _LAYERS + _FROM_V1 + "COMMIT;")
                    problems = self._conn.execute("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise RuntimeError(f"store migration left dangling references: {problems[:5]}")
                finally:
                    self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + _LAYERS + _LAYER_VIEW + "COMMIT;")
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(snapshots)")}
            if "exported" not in columns:  # added with registry exports; older stores lack it
                self._conn.execute("ALTER TABLE snapshots ADD COLUMN exported TEXT NOT NULL DEFAULT ''")
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(layer_blobs)")}
            if "entries" not in columns:  # schema 5: a blob's entry count, announced when pushed again
                self._conn.execute("ALTER TABLE layer_blobs ADD COLUMN entries INTEGER NOT NULL DEFAULT 0")
            if "expanded" not in columns:  # schema 6: a compressed blob's tar size
                self._conn.execute("ALTER TABLE layer_blobs ADD COLUMN expanded INTEGER NOT NULL DEFAULT 0")
        with self.tx() as tx:
            row = tx.c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                tx.c.execute(
                    "INSERT INTO meta (key,value) VALUES ('schema_version',?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"store schema {row[0]} is newer than this driver ({SCHEMA_VERSION})")
            elif int(row[0]) < SCHEMA_VERSION:  # migrated above
                tx.c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    @property
    def schema_version(self) -> int:
        with self.read() as r:
            return int(r.c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    def pin(self, layer_id: str) -> None:
        with self._lock:
            self.pinned[layer_id] += 1

    def unpin(self, layer_id: str) -> None:
        with self._lock:
            self.pinned[layer_id] -= 1
            if self.pinned[layer_id] <= 0:
                del self.pinned[layer_id]

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction: committed on success, rolled back on any exception.
        On a disk with less free than the store's reserve the reserve is given back
        first; a disk too full even so is RESOURCE_EXHAUSTED (nothing changed)."""
        with self._lock:
            self.reserve.before_write()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                tx = Tx(self._conn, self.pinned)
                yield tx
                self._conn.execute("COMMIT")
                if tx.changed_layers:
                    self._log_layers(frozenset(tx.changed_layers))
            except BaseException as e:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError) and e.sqlite_errorcode == SQLITE_FULL:
                    raise ResourceExhausted(
                        f"the node's disk is full: the driver's store could not write "
                        f"({self.reserve.free() // MiB} MiB free); nothing changed, free space on the node"
                    ) from e
                raise

    def _log_layers(self, ids: frozenset[str]) -> None:
        if len(self._layer_log) == self._layer_log.maxlen:
            self._layer_log_floor = self._layer_log[0][0]
        self._layer_generation += 1
        self._layer_log.append((self._layer_generation, ids))

    def layer_changes(self, since: int) -> tuple[int, set[str] | None]:
        """(the layer generation now, the ids of the layer rows added, changed or deleted
        since generation ``since``); None for the ids when they are not known: ``since``
        is -1, the log has dropped them, or another process wrote to the store (read
        everything again then). Costs the changes since, not the layers there are."""
        with self._lock:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:  # another connection (process) committed
                self._data_version = version
                self._layer_log.clear()
                self._layer_log_floor = self._layer_generation
                return self._layer_generation, None
            if since < self._layer_log_floor:
                return self._layer_generation, None
            changed: set[str] = set()
            for generation, ids in reversed(self._layer_log):
                if generation <= since:
                    break
                changed |= ids
            return self._layer_generation, changed

    @contextmanager
    def read(self) -> Iterator[ReadTx]:
        """One read transaction without the write lock: a consistent snapshot of what was
        committed when it first reads. It does not see the uncommitted changes of a ``tx()``
        open on the same thread, and cannot be nested (on one thread)."""
        conn = self._reader()
        conn.execute("BEGIN DEFERRED")
        try:
            yield ReadTx(conn, self.pinned)
        finally:
            conn.execute("ROLLBACK")

    def healthy(self) -> bool:
        try:
            with self.read() as r:
                r.c.execute("SELECT 1 FROM meta LIMIT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        """Close the writer and every thread's reader; reads and writes then raise."""
        with self._lock, self._readers_lock:
            self._closed = True
            self._conn.close()
            for conn in list(self._readers):
                conn.close()
            self._readers.clear()


class Unreadable(Exception):
    """A store that cannot be opened or read (``summarize``): SQLite's message."""


def summarize(path: Path) -> StoreSummary:
    """Read a store's figures and check its integrity without migrating it or taking the
    writer's lock (read-only: a driver may be serving it). Raises ``Unreadable``."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
            volumes, provisioned = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(capacity_bytes), 0) FROM volumes"
            ).fetchone()
            snapshots = conn.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0]
            layers = conn.execute("SELECT COUNT(*) FROM layers").fetchone()[0]
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise Unreadable(str(e)) from e
    return StoreSummary(str(version), int(volumes), int(provisioned), int(snapshots), int(layers), integrity)
