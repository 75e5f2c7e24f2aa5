"""What comes from outside about registries, checked before anything is asked of
one: references in parameters and snapshot ids, and what manifests claim."""

from __future__ import annotations

import pytest

from csi_driver.engine.transfers import exported_id, snapshot_reference
from csi_driver.errors import InvalidArgument
from csi_driver.layerstore.overlay.backend import capabilities
from csi_driver.registry.artifact import snapshot_claims
from csi_driver.registry.client import BadContent, descriptors
from csi_driver.registry.reference import BadReference, Reference, Repository
from csi_driver.service import validate as v

OFFERED = capabilities()
FS = OFFERED.artifact_fs_types
LOCAL = "snap-" + "a" * 32
DIGEST = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    "text",
    [
        "registry.example.com/base/debian:bookworm",
        "localhost:5000/a/b/c:v1.2-rc_3",
        "127.0.0.1:5000/x@" + DIGEST,
        "reg.io/x:tag@" + DIGEST,
        "[::1]:5000/x:1",
    ],
)
def test_references_that_parse_round_trip(text: str) -> None:
    ref = Reference.parse(text)
    assert str(ref) == text
    assert ref.version == (ref.digest or ref.tag)


@pytest.mark.parametrize(
    "text",
    [
        "debian:bookworm",  # no registry host: docker.io is never implied
        "library/debian:12",  # a first part without '.', ':' or localhost is a path
        "reg.io/x",  # neither tag nor digest
        "reg.io/Upper:1",  # paths are lowercase
        "reg.io/x:" + "t" * 129,
        "reg.io/x@sha256:short",
        "reg.io/../x:1",
        "reg.io/x:1 ; rm -rf /",
        "https://reg.io/x:1",
        "reg.io/" + "a/" * 130 + "x:1",
        "",
    ],
)
def test_references_that_do_not(text: str) -> None:
    with pytest.raises(BadReference):
        Reference.parse(text)


def test_repositories() -> None:
    assert str(Repository.parse("reg.io:5000/team/db")) == "reg.io:5000/team/db"
    for bad in ("reg.io", "reg.io/x:1", "db", "reg.io/x/"):
        with pytest.raises(BadReference):
            Repository.parse(bad)


def test_an_exported_snapshot_id_is_its_artifacts_reference() -> None:
    repo = Repository.parse("reg.io:5000/backups/db")
    sid = exported_id(repo, LOCAL)
    assert sid == f"reg.io:5000/backups/db:{LOCAL}"
    assert snapshot_reference(sid) == Reference(repo, LOCAL, None)
    assert v.SNAPSHOT_ID_RE.match(sid) and v.SNAPSHOT_ID_RE.match(LOCAL)
    for local_or_foreign in (LOCAL, "reg.io/x:latest", "nohost/x:" + LOCAL, "reg.io/x:snap-1@" + DIGEST):
        assert snapshot_reference(local_or_foreign) is None
    with pytest.raises(InvalidArgument, match="128 bytes"):
        exported_id(Repository.parse("reg.io/" + "x" * 100), LOCAL)


def test_base_layer_and_snapshot_parameters() -> None:
    assert v.volume_parameters({"baseLayer": "golden"}, OFFERED) == {"baseLayer": "golden"}
    assert v.volume_parameters({"baseLayer": "reg.io/base:1"}, OFFERED)["baseLayer"] == "reg.io/base:1"
    for bad in ("reg.io/Base:1", "golden/", "-x"):
        with pytest.raises(InvalidArgument):
            v.volume_parameters({"baseLayer": bad}, OFFERED)
    assert v.snapshot_parameters({}).repository is None
    assert v.snapshot_parameters({"repository": "reg.io/a"}).repository == Repository("reg.io", "a")
    with pytest.raises(InvalidArgument, match="repository"):
        v.snapshot_parameters({"repository": "reg.io/a:tag"})
    with pytest.raises(InvalidArgument, match="unknown"):
        v.snapshot_parameters({"repo": "reg.io/a"})


def test_descriptors_are_checked() -> None:
    good = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": DIGEST, "size": 10}
    assert descriptors([good], "x")[0].size == 10
    for bad in (
        "not a list",
        [{"mediaType": "m", "digest": "md5:00", "size": 1}],
        [{**good, "size": -1}],
        [{**good, "size": True}],
        [{**good, "size": 1 << 50}],
        [{**good, "annotations": {"k": 1}}],
        [{**good, "mediaType": None}],
        ["string"],
    ):
        with pytest.raises(BadContent):
            descriptors(bad, "x")


def test_snapshot_claims_are_checked() -> None:
    p = "dev.overlay-csi.snapshot."
    good = {
        p + "source-volume": "vol-1",
        p + "fs-type": "xfs",
        p + "source-capacity": "1048576",
        p + "size": "0",
    }
    # a manifest written before block exports names no access type: it reads as a mount volume's
    assert snapshot_claims(good, "x", FS) == {"source-volume": "vol-1", "fs-type": "xfs",
                                              "source-capacity": 1048576, "size": 0,
                                              "access-type": "mount"}  # fmt: skip
    for change in (
        {p + "fs-type": "../../etc"},
        {p + "source-capacity": "-1"},
        {p + "source-capacity": "0"},
        {p + "size": "1e9"},
        {p + "size": "9" * 19},
        {p + "source-volume": ""},
        {p + "source-volume": "v" * 129},
    ):
        with pytest.raises(BadContent):
            snapshot_claims({**good, **change}, "x", FS)
    with pytest.raises(BadContent):
        snapshot_claims(None, "x", FS)
