"""Restores in one pass: a layer of the driver's own exports is built from the
download stream, hashed as it arrives, and installed only once its digest checks.
Its descriptor announces what its tar expands to and how many entries it holds;
the announcement is untrusted (DATA_LOSS beyond it). A foreign blob without it
still restores (downloaded, counted, then built)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.registry import artifact
from csi_driver.registry.client import OCI_MANIFEST, RegistryClient
from csi_driver.registry.reference import Repository
from driver_harness import Driver, staged
from registry_harness import REGISTRY_BINARY, FaultProxy, LocalRegistry
from registry_nodes import code_of, registry_nodes

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

MiB = 1 << 20
REPO = "backups/db"
EMPTY = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
GZIP_TAR = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[LocalRegistry, Driver, Driver]]:
    with registry_nodes(tmp_path) as n:
        yield n


def nothing_left(d: Driver) -> None:
    assert d.engine.layers() == []
    assert d.engine.list_snapshots(0, 100) == []
    assert list((d.state / "tmp").iterdir()) == []
    assert d.engine.capacity.figures().pending == 0, "the admission is released"


def no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make a blob download to a file (the two-pass path) fail the test; the digests tried."""
    tried: list[str] = []

    def refuse(self: RegistryClient, digest: str, size: int, dest: Path) -> None:
        tried.append(digest)
        raise AssertionError(f"blob {digest[:19]} was downloaded to a file")

    monkeypatch.setattr(RegistryClient, "pull_blob", refuse)
    return tried


def imports(d: Driver, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record how each layer import of ``d`` ended ("built" or the exception's name)."""
    ended: list[str] = []
    real = d.engine.backend.import_diff

    def spy(*args, **kwargs):
        try:
            built = real(*args, **kwargs)
        except BaseException as e:
            ended.append(type(e).__name__)
            raise
        ended.append("built")
        return built

    monkeypatch.setattr(d.engine.backend, "import_diff", spy)
    return ended


def test_an_export_announces_its_layers_and_restores_in_one_pass(
    nodes: tuple[LocalRegistry, Driver, Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, a, b = nodes
    vid = a.client.create_volume("v", 64 * MiB).volume_id
    with staged(a, vid) as root:
        (root / "d").mkdir()
        for i in range(20):
            (root / "d" / f"f{i}").write_bytes(bytes([i]) * (i * 1000))
    s1 = a.client.create_snapshot("s1", vid, parameters={"repository": f"{reg.host}/{REPO}"})
    with staged(a, vid) as root:
        (root / "more").write_text("more\n")
    s2 = a.client.create_snapshot("s2", vid, parameters={"repository": f"{reg.host}/{REPO}"})
    client = RegistryClient(Repository(reg.host, REPO), insecure=True)
    manifest = client.pull_manifest(s2.snapshot_id.rpartition(":")[2]).body
    layers = manifest["layers"]
    assert len(layers) == 2, "s1's layer (pushed before, found in the registry) and s2's own"
    for layer in layers:
        notes = layer.get("annotations", {})
        assert notes.get(artifact.LAYER_EXPANDED) == str(layer["size"]), layer
        assert int(notes.get(artifact.LAYER_ENTRIES, "0")) >= 2, layer
    assert int(layers[0]["annotations"][artifact.LAYER_ENTRIES]) >= 1 + 1 + 20, "root, d/ and 20 files"

    tried = no_download(monkeypatch)
    built = imports(b, monkeypatch)
    restored = b.client.create_volume("r", 64 * MiB, snapshot=s2.snapshot_id)
    assert tried == [] and built == ["built", "built"], "both layers built from the download stream"
    with staged(b, restored.volume_id) as root:
        assert (root / "more").read_text() == "more\n"
        assert (root / "d" / "f19").read_bytes() == bytes([19]) * 19000
    b.client.delete_volume(restored.volume_id)
    nothing_left(b)
    for snap in (s1, s2):
        a.client.delete_snapshot(snap.snapshot_id)
    a.client.delete_volume(vid)


def test_a_blob_that_fails_its_digest_mid_stream_leaves_nothing(
    nodes: tuple[LocalRegistry, Driver, Driver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer is built while the blob arrives; its digest is known only at the end:
    a byte flipped in the middle fails it there (DATA_LOSS) and nothing is left of it.
    Cut off mid-stream once, it resumes with Range into the same hash and restores."""
    reg, a, b = nodes
    with FaultProxy(reg.url) as proxy:
        for d in (a, b):
            d.engine.transfers.insecure = d.engine.transfers.insecure | {proxy.host}
        vid = a.client.create_volume("v", 64 * MiB).volume_id
        with staged(a, vid) as root:
            (root / "data").write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB, no holes
        snap = a.client.create_snapshot("s", vid, parameters={"repository": f"{proxy.host}/{REPO}"})
        tried = no_download(monkeypatch)
        built = imports(b, monkeypatch)
        layer = r"/blobs/sha256:(?!44136fa3)"
        proxy.corrupt(layer, times=-1)
        code, message = code_of(b.client.create_volume, "r", 64 * MiB, snapshot=snap.snapshot_id)
        assert code == grpc.StatusCode.DATA_LOSS and "does not match its digest" in message, message
        assert built == ["built"], "the layer was built from the stream, then discarded"
        nothing_left(b)

        proxy.clear()
        proxy.truncate(layer, keep=3 * MiB, times=1)
        restored = b.client.create_volume("r", 64 * MiB, snapshot=snap.snapshot_id)
        assert [r for r in proxy.requests if r[0] == "GET" and r[2] == 206], "resumed with a Range"
        assert tried == []
        with staged(b, restored.volume_id) as root:
            assert (root / "data").read_bytes() == bytes(range(256)) * (12 * 4096)
        b.client.delete_volume(restored.volume_id)
        nothing_left(b)
        a.client.delete_snapshot(snap.snapshot_id)
        a.client.delete_volume(vid)


def tar_of(entries: int, data: bytes = b"") -> bytes:
    """An uncompressed layer tar: ``entries`` small files, the first holding ``data``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(entries):
            ti = tarfile.TarInfo(f"f{i}")
            content = data if i == 0 else b"x"
            ti.size = len(content)
            tar.addfile(ti, io.BytesIO(content))
    return raw.getvalue()


def push_artifact(
    reg: LocalRegistry, blob: bytes, media_type: str, notes: dict[str, str], scratch: Path
) -> str:
    """A snapshot artifact of one layer ``blob`` whose descriptor carries ``notes``: its id."""
    client = RegistryClient(Repository(reg.host, REPO), insecure=True)
    (scratch / "empty").write_bytes(b"{}")
    client.push_blob(scratch / "empty", EMPTY, 2)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (scratch / "layer").write_bytes(blob)
    client.push_blob(scratch / "layer", digest, len(blob))
    layer = {"mediaType": media_type, "digest": digest, "size": len(blob), "annotations": notes}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact.ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY, "size": 2},
        "layers": [layer],
        "annotations": {
            artifact.NOTE + "source-volume": "vol-1",
            artifact.NOTE + "fs-type": "ext4",
            artifact.NOTE + "source-capacity": str(64 * MiB),
            artifact.NOTE + "size": "0",
        },
    }
    tag = "snap-" + hashlib.md5(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    client.push_manifest(manifest, tag)
    return f"{reg.host}/{REPO}:{tag}"


def announce(expanded: int, entries: int) -> dict[str, str]:
    return {artifact.LAYER_EXPANDED: str(expanded), artifact.LAYER_ENTRIES: str(entries)}


def test_what_a_layer_announces_is_a_limit(
    nodes: tuple[LocalRegistry, Driver, Driver], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """More entries than announced, a gzip that expands beyond what it announces, or a
    plain tar that announces another size than its own: DATA_LOSS, nothing left. The
    honest announcement restores; without one (a foreign blob) it restores too."""
    reg, _a, b = nodes
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tried = no_download(monkeypatch)
    built = imports(b, monkeypatch)
    tar = tar_of(50, bytes(3 * MiB))
    zipped = gzip.compress(tar, mtime=0)
    for blob, kind, notes, words in (
        (tar, artifact.LAYER_TAR, announce(len(tar), 49), "more than its manifest announces"),
        (zipped, GZIP_TAR, announce(len(tar) - MiB, 51), "expands beyond the"),
        (tar, artifact.LAYER_TAR, announce(len(tar) + 1, 51), "announces"),
    ):
        sid = push_artifact(reg, blob, kind, notes, scratch)
        code, message = code_of(b.client.create_volume, "r", 64 * MiB, snapshot=sid)
        assert code == grpc.StatusCode.DATA_LOSS and words in message, message
        nothing_left(b)
    assert tried == [], "announced layers are never downloaded to a file"
    assert built == ["TooManyEntries", "DiffError"], "refused while they were built (the third: before)"

    for blob, kind in ((tar, artifact.LAYER_TAR), (zipped, GZIP_TAR)):
        sid = push_artifact(reg, blob, kind, announce(len(tar), 51), scratch)
        restored = b.client.create_volume("r", 64 * MiB, snapshot=sid)
        with staged(b, restored.volume_id) as root:
            assert (root / "f0").stat().st_size == 3 * MiB and (root / "f49").read_bytes() == b"x"
        b.client.delete_volume(restored.volume_id)
        nothing_left(b)
    assert tried == []

    monkeypatch.undo()  # a foreign blob: downloaded, counted, then built
    sid = push_artifact(reg, zipped, GZIP_TAR, {}, scratch)
    restored = b.client.create_volume("r", 64 * MiB, snapshot=sid)
    with staged(b, restored.volume_id) as root:
        assert (root / "f49").read_bytes() == b"x"
    b.client.delete_volume(restored.volume_id)
    nothing_left(b)
