"""The metadata store: lock-free snapshot reads beside a writer, and one-query layer chains."""

from __future__ import annotations

import ast
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import pytest

from csi_driver.store import SCHEMA_VERSION, Blob, Layer, PendingDelete, ReadTx, Snapshot, Store, Volume

QUERIES = (
    "layer layer_by_name layers chain volume volume_by_name volumes count_staged count_attached"
    " publications publication_at attachment attached_nodes snapshot snapshot_by_name snapshots"
    " group group_by_name layer_users unreferenced_layers dependents census layer_sizes"
    " has_layers"
).split()
CHANGES = (
    "add_layer collect_garbage update_layer add_volume update_volume delete_volume add_publication"
    " delete_publication attach detach add_snapshot delete_snapshot add_group delete_group repoint_snapshot"
).split()


def _layer(parent: str | None = None, name: str | None = None) -> Layer:
    return Layer(
        id=uuid.uuid4().hex,
        parent=parent,
        link=uuid.uuid4().hex[:20],
        name=name,
        active=0,
        fs_type="ext4",
        depth=0,
        image_bytes=1 << 20,
        used_bytes=0,
        created_at=time.time(),
    )


def _stack(store: Store, depth: int) -> list[Layer]:
    """A chain of ``depth`` layers, bottom (named base) first."""
    layers = [_layer(name="base")]
    for _ in range(depth - 1):
        layers.append(_layer(parent=layers[-1].id))
    with store.tx() as tx:
        for layer in layers:
            tx.add_layer(layer)
    return layers


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def test_read_is_not_blocked_by_an_open_write_and_sees_only_committed_rows(store: Store):
    committed, pending = _layer(name="committed"), _layer(name="pending")
    with store.tx() as tx:
        tx.add_layer(committed)
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.tx() as tx:
            tx.add_layer(pending)
            inside.set()
            release.wait(timeout=5)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(timeout=5)
        start = time.monotonic()
        with store.read() as r:
            seen = [x.id for x in r.layers()]
        assert store.healthy()
        elapsed = time.monotonic() - start
    finally:
        release.set()
        t.join(timeout=10)
    assert elapsed < 1, "a read waited for the writer"
    assert seen == [committed.id], "a read saw what the open write had not committed"
    with store.read() as r:
        assert {x.id for x in r.layers()} == {committed.id, pending.id}


def test_a_read_is_one_snapshot_even_while_a_write_commits(store: Store):
    before = _layer(name="before")
    with store.tx() as tx:
        tx.add_layer(before)
    with store.read() as r:
        assert [x.id for x in r.layers()] == [before.id]
        with store.tx() as tx:  # the same thread: the writer has its own connection
            tx.add_layer(_layer(name="after"))
        assert [x.id for x in r.layers()] == [before.id]
    with store.read() as r:
        assert len(r.layers()) == 2


@pytest.mark.parametrize("view", ["read", "tx"])
def test_a_deep_chain_is_one_statement_nearest_first(store: Store, view: str):
    layers = _stack(store, 100)
    opened: Callable[[], AbstractContextManager[ReadTx]] = getattr(store, view)
    statements: list[str] = []
    with opened() as r:
        r.c.set_trace_callback(statements.append)
        try:
            chain = r.chain(layers[-1].id)
        finally:
            r.c.set_trace_callback(None)
    assert [x.id for x in chain] == [x.id for x in reversed(layers)]
    assert chain[-1] == layers[0] and chain[0] == layers[-1], "rows come back whole"
    assert len(statements) == 1, statements
    with store.read() as r:
        assert r.chain(None) == [] and r.chain(layers[0].id) == [layers[0]]


def _raw(store: Store, sql: str, *args: object) -> None:
    """A change the store itself refuses (its connections enforce foreign keys)."""
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute(sql, args)
    conn.close()


def test_a_dangling_parent_raises_lookup_error(store: Store):
    layers = _stack(store, 3)
    missing = uuid.uuid4().hex
    _raw(store, "UPDATE layers SET parent=? WHERE id=?", missing, layers[0].id)
    with store.read() as r:
        with pytest.raises(LookupError, match=f"layer {missing} missing from store"):
            r.chain(layers[-1].id)
        with pytest.raises(LookupError, match=f"layer {missing} missing from store"):
            r.chain(missing)


def test_a_parent_cycle_raises_instead_of_looping(store: Store):
    layers = _stack(store, 3)
    _raw(store, "UPDATE layers SET parent=? WHERE id=?", layers[-1].id, layers[0].id)
    with store.read() as r, pytest.raises(LookupError, match="loops"):
        r.chain(layers[-1].id)


def test_the_read_view_has_every_query_and_refuses_writes(store: Store):
    with store.read() as r:
        assert type(r) is ReadTx
        assert all(callable(getattr(r, name)) for name in QUERIES)
        assert not [name for name in CHANGES if hasattr(r, name)]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            r.c.execute("INSERT INTO groups (id,name,members,created_at) VALUES ('g','g','[]',0)")
        assert r.group("g") is None
    with store.tx() as tx:
        tx.add_group("g", "g", [])
        assert all(callable(getattr(tx, name)) for name in QUERIES + CHANGES)


def test_pinned_layers_are_never_collected(store: Store):
    base, top = _stack(store, 2)
    store.pin(top.id)
    with store.tx() as tx:
        assert tx.collect_garbage() == []
    with store.read() as r:
        assert r.unreferenced_layers() == []
    store.unpin(top.id)
    with store.read() as r:
        assert r.unreferenced_layers() == [top]
    with store.tx() as tx:
        assert tx.collect_garbage() == [top]
        assert tx.layers() == [base]


def _reader_of_a_thread(store: Store, until: threading.Event | None = None) -> sqlite3.Connection:
    """The reader connection a new thread opens; the thread stays alive until ``until``, if given."""
    got: list[sqlite3.Connection | BaseException] = []
    ready = threading.Event()

    def run() -> None:
        try:
            with store.read() as r:
                got.append(r.c)
        except BaseException as e:
            got.append(e)
        finally:
            ready.set()
        if until is not None:
            until.wait(timeout=10)

    t = threading.Thread(target=run)
    t.start()
    assert ready.wait(timeout=10)
    if until is None:
        t.join(timeout=10)
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def _is_closed(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_a_finished_thread_closes_its_reader(store: Store):
    assert _is_closed(_reader_of_a_thread(store))


def test_close_closes_every_reader(store: Store):
    with store.read() as r:
        mine = r.c
    hold = threading.Event()
    try:
        theirs = _reader_of_a_thread(store, until=hold)
        store.close()
        assert _is_closed(mine) and _is_closed(theirs)
    finally:
        hold.set()
    with pytest.raises(sqlite3.ProgrammingError), store.read():
        pass
    with pytest.raises(sqlite3.ProgrammingError):
        _reader_of_a_thread(store)
    assert not store.healthy()


V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE layers (
    id TEXT PRIMARY KEY, parent TEXT REFERENCES layers(id), link TEXT NOT NULL UNIQUE,
    name TEXT UNIQUE, active INTEGER NOT NULL, fs_type TEXT NOT NULL, depth INTEGER NOT NULL,
    image_bytes INTEGER NOT NULL, used_bytes INTEGER NOT NULL, created_at REAL NOT NULL,
    base_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE volumes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL UNIQUE,
    capacity_bytes INTEGER NOT NULL, upper TEXT NOT NULL REFERENCES layers(id),
    access_type TEXT NOT NULL, fs_type TEXT NOT NULL, source_kind TEXT NOT NULL DEFAULT '',
    source_id TEXT NOT NULL DEFAULT '', parameters TEXT NOT NULL DEFAULT '{}',
    mutable TEXT NOT NULL DEFAULT '{}', ephemeral INTEGER NOT NULL DEFAULT 0, staging_path TEXT,
    stage_options TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO layers VALUES ('b', NULL, 'BBBBBBBBBB', 'base', 0, 'ext4', 1, 100, 40, 1.0, 7);
INSERT INTO layers VALUES ('u', 'b', 'UUUUUUUUUU', NULL, 1, 'ext4', 1, 200, 0, 2.0, 9);
INSERT INTO volumes (id, name, capacity_bytes, upper, access_type, fs_type, created_at)
    VALUES ('vol-1', 'pvc', 200, 'u', 'mount', 'ext4', 3.0);
"""


def test_a_schema_1_store_moves_the_backend_fields_to_their_own_table(tmp_path):
    """An existing state dir keeps every layer, link and baseline; the layers table
    afterwards holds the graph only, and deleting a layer deletes its storage row."""
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1)
    conn.close()

    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION
        with store.read() as r:
            chain = r.chain("u")
            columns = {row[1] for row in r.c.execute("PRAGMA table_info(layers)")}
        assert [(x.id, x.link, x.base_bytes, x.parent) for x in chain] == [
            ("u", "UUUUUUUUUU", 9, "b"),
            ("b", "BBBBBBBBBB", 7, None),
        ]
        assert "link" not in columns and "base_bytes" not in columns
        with store.tx() as tx:
            tx.update_layer("u", active=0, base_bytes=11)
            assert (tx.layer("u").active, tx.layer("u").base_bytes) == (0, 11)
            tx.delete_volume("vol-1")
            tx.update_layer("b", name=None)
            assert {x.id for x in tx.collect_garbage()} == {"u", "b"}
            assert tx.c.execute("SELECT COUNT(*) FROM layer_storage").fetchone()[0] == 0
    finally:
        store.close()
    Store(db).close()  # opening a migrated store again changes nothing


def test_a_store_from_before_registries_gains_the_exported_column_and_blob_table(tmp_path):
    """Snapshots recorded before exports existed read as local (not exported), and
    a layer's blob rows go with the layer."""
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1)
    conn.executescript(
        """CREATE TABLE snapshots (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL UNIQUE,
            source_volume_id TEXT NOT NULL, layer TEXT NOT NULL REFERENCES layers(id),
            access_type TEXT NOT NULL, fs_type TEXT NOT NULL, source_capacity INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL, group_id TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL);
        INSERT INTO snapshots (id, name, source_volume_id, layer, access_type, fs_type, source_capacity,
            size_bytes, created_at) VALUES ('snap-1', 's', 'vol-1', 'b', 'mount', 'ext4', 200, 40, 4.0);"""
    )
    conn.close()
    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION, "an older driver refuses it, not misreads it"
        with store.tx() as tx:
            assert tx.snapshot("snap-1").exported == ""
            tx.set_exported("snap-1", "sha256:" + "a" * 64)
            tx.add_layer_blob(Blob("b", "sha256:" + "b" * 64, 10, "application/vnd.oci.image.layer.v1.tar"))
            assert tx.layer_from_blob("sha256:" + "b" * 64, None).id == "b"
            assert tx.layer_from_blob("sha256:" + "b" * 64, "u") is None, "one blob, one parent"
            tx.delete_snapshot("snap-1")
            tx.delete_volume("vol-1")
            tx.update_layer("b", name=None)
            tx.collect_garbage()
            assert tx.c.execute("SELECT COUNT(*) FROM layer_blobs").fetchone()[0] == 0
    finally:
        store.close()
    Store(db).close()


def _older_store(db: Path, blob: Blob, downgrade: str) -> None:
    """Leave at ``db`` a store whose layer "b" has ``blob``, taken back by the SQL
    ``downgrade`` to what a driver of an older schema left."""
    store = Store(db)
    with store.tx() as tx:
        tx.add_layer(replace(_layer(), id="b"))
        tx.add_layer_blob(blob)
    store.close()
    conn = sqlite3.connect(db)
    conn.executescript(downgrade)
    conn.close()


def test_a_schema_3_store_gains_blob_sources_and_trusts_no_old_blob_row(tmp_path):
    """Schema 4 records the repositories a layer's blob came from or went to. A store of
    schema 3 knows blobs but not where from: its layers are found by digest, but none as
    coming from a repository, so a pull makes the registry serve the blob once."""
    db = tmp_path / "state.db"
    digest, tar = "sha256:" + "c" * 64, "application/vnd.oci.image.layer.v1.tar"
    # what a driver of schema 3 left: no sources table
    _older_store(
        db,
        Blob("b", digest, 10, tar),
        "DROP TABLE layer_blob_sources; UPDATE meta SET value='3' WHERE key='schema_version';",
    )

    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION
        repo = "reg.io/a/db"
        with store.tx() as tx:
            assert tx.layer_from_blob(digest, None).id == "b", "the blob still names its layer"
            assert tx.layer_from_blob(digest, None, repo) is None, "but no repository served it here"
            tx.add_layer_blob(Blob("b", digest, 10, tar), repository=repo)
            assert tx.layer_from_blob(digest, None, repo).id == "b"
            assert tx.layer_from_blob(digest, None, "reg.io/b/db") is None, "one repository is not another"
            assert tx.blob_sources("b") == [(digest, repo)]
            tx.update_layer("b", name=None)
            assert [x.id for x in tx.collect_garbage()] == ["b"]
            assert tx.c.execute("SELECT COUNT(*) FROM layer_blob_sources").fetchone()[0] == 0, "gone with it"
    finally:
        store.close()
    Store(db).close()


def test_a_schema_4_store_gains_pending_deletes_that_hold_no_secret(tmp_path):
    """Schema 5 records the exported snapshots deleted while their registry could not be
    reached: reference, digest, when, retries, last error; nothing else (no credentials)."""
    db = tmp_path / "state.db"
    Store(db).close()
    conn = sqlite3.connect(db)  # what a driver of schema 4 left: no pending_deletes table
    conn.executescript("DROP TABLE pending_deletes; UPDATE meta SET value='4' WHERE key='schema_version';")
    conn.close()

    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION == 6
        sid = "reg.io/a/db:snap-" + "1" * 32
        with store.tx() as tx:
            tx.add_pending_delete(PendingDelete(sid, "sha256:" + "d" * 64, 5.0, last_error="refused"))
            tx.add_pending_delete(PendingDelete(sid, "", 6.0))  # recorded already: that one stays
            tx.retried_delete(sid, "still refused")
        with store.read() as r:
            assert r.pending_deletes() == [PendingDelete(sid, "sha256:" + "d" * 64, 5.0, 1, "still refused")]
            columns = [row[1] for row in r.c.execute("PRAGMA table_info(pending_deletes)")]
        assert columns == ["snapshot_id", "digest", "recorded_at", "attempts", "last_error"]
        with store.tx() as tx:
            tx.delete_pending_delete(sid)
            assert tx.pending_delete(sid) is None
    finally:
        store.close()


def test_a_schema_4_store_gains_blob_entries_and_keeps_a_known_count(tmp_path):
    """Schema 5 records how many entries a layer's tar holds (announced when it is pushed
    again). Blobs of a schema 4 store read as unknown (0); a count, once known, stays."""
    db = tmp_path / "state.db"
    digest, tar = "sha256:" + "d" * 64, "application/vnd.oci.image.layer.v1.tar"
    # what a driver of schema 4 left: no entries column
    _older_store(
        db,
        Blob("b", digest, 10, tar),
        "ALTER TABLE layer_blobs DROP COLUMN entries; UPDATE meta SET value='4' WHERE key='schema_version';",
    )

    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION == 6
        with store.tx() as tx:
            assert tx.layer_blobs("b") == [Blob("b", digest, 10, tar, 0)], "unknown"
            tx.add_layer_blob(Blob("b", digest, 10, tar, 7), repository="reg.io/a/db")
            assert tx.layer_blobs("b")[0].entries == 7, "a count learnt later is kept"
            tx.add_layer_blob(Blob("b", digest, 10, tar, 0))
            tx.add_layer_blob(Blob("b", digest, 10, tar, 9))
            assert tx.layer_blobs("b")[0].entries == 7, "and not overwritten"
    finally:
        store.close()


def test_a_schema_5_store_gains_blob_expansion(tmp_path):
    """Schema 6 records a compressed blob's tar size (announced when it is pushed again);
    blobs of a schema 5 store read as unknown (0)."""
    db = tmp_path / "state.db"
    digest, zstd = "sha256:" + "e" * 64, "application/vnd.oci.image.layer.v1.tar+zstd"
    # what a driver of schema 5 left: no expanded column
    _older_store(
        db,
        Blob("b", digest, 10, zstd, 3),
        "ALTER TABLE layer_blobs DROP COLUMN expanded; UPDATE meta SET value='5' WHERE key='schema_version';",
    )

    store = Store(db)
    try:
        assert store.schema_version == SCHEMA_VERSION == 6
        with store.tx() as tx:
            assert tx.layer_blobs("b") == [Blob("b", digest, 10, zstd, 3, 0)], "unknown"
            tx.add_layer_blob(Blob("b", "sha256:" + "f" * 64, 10, zstd, 3, 4096))
            assert tx.layer_blobs("b")[1].expanded == 4096
    finally:
        store.close()


def test_no_module_but_the_store_runs_sql():
    """All SQL lives in store.py: a query elsewhere (``.execute``, ``sqlite3``) is a seam leaking."""
    package = Path(__file__).resolve().parents[1] / "csi_driver"
    leaks = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            called = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if called and node.func.attr in ("execute", "executemany", "executescript"):
                leaks.append(f"{path.relative_to(package)}:{node.lineno} .{node.func.attr}()")
            imported = [a.name for a in node.names] if isinstance(node, ast.Import | ast.ImportFrom) else []
            if "sqlite3" in imported or (isinstance(node, ast.ImportFrom) and node.module == "sqlite3"):
                leaks.append(f"{path.relative_to(package)}:{node.lineno} imports sqlite3")
    assert leaks == []


def test_a_layers_dependents_are_everything_stacked_on_it(store: Store):
    base, mid, top = _stack(store, 3)
    side = _layer(parent=base.id)
    with store.tx() as tx:
        tx.add_layer(side)
        for n, upper in enumerate((top, side)):
            tx.add_volume(
                Volume(
                    0,
                    f"vol-{n}",
                    f"v{n}",
                    1 << 20,
                    upper.id,
                    "mount",
                    "ext4",
                    "",
                    "",
                    {},
                    {},
                    False,
                    None,
                    {},
                    time.time(),
                )
            )
        tx.add_snapshot(Snapshot(0, "snap-1", "s1", "vol-0", mid.id, "mount", "ext4", 1 << 20, 0, "", 0.0))
    with store.read() as r:
        at_base, at_mid, at_top = (r.dependents(x.id) for x in (base, mid, top))
    assert sorted(at_base.children) == sorted([mid.id, side.id]) and at_base.owner is None
    assert at_base.volumes == ["vol-0", "vol-1"] and at_base.snapshots == ["snap-1"]
    assert at_mid.children == [top.id] and at_mid.volumes == ["vol-0"] and at_mid.snapshots == ["snap-1"]
    assert at_top.owner == "vol-0" and at_top.children == [] and at_top.snapshots == []
