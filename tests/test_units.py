"""Unit tests of the pure parts: mount composition, the store, sizing, validation."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from csi_driver.errors import InvalidArgument
from csi_driver.ids import new_id, new_link
from csi_driver.layerstore.overlay.compose import PAGE_SIZE, OptionsTooLong, overlay_options
from csi_driver.layerstore.overlay.images import image_size_for
from csi_driver.layerstore.overlay.layout import Layout
from csi_driver.service import validate
from csi_driver.store import SCHEMA_VERSION, Layer, Store

MiB = 1 << 20


def test_overlay_options_fit_a_page_at_the_depth_cap():
    links = [new_link() for _ in range(64)]
    opts = ",".join(overlay_options(links, new_id()))
    assert len(opts) < PAGE_SIZE // 2, "relative short links keep 64 layers well under a page"
    assert opts.startswith("lowerdir=l/" + links[0] + ":")  # nearest layer first
    assert ":empty," in opts and "upperdir=layers/" in opts


def test_overlay_options_refuse_more_than_a_page():
    with pytest.raises(OptionsTooLong):
        overlay_options([new_link() for _ in range(400)], new_id())


def test_layout_refuses_foreign_ids(tmp_path: Path):
    layout = Layout(tmp_path)
    for bad in ("../etc", "a/b", "", "x" * 32, new_id() + "/.."):
        with pytest.raises(ValueError):
            layout.layer_dir(bad)
    with pytest.raises(ValueError):
        layout.link("../../x")


def _layer(parent: str | None = None, name: str | None = None, active: int = 0) -> Layer:
    return Layer(id=new_id(), parent=parent, link=new_link(), name=name, active=active, fs_type="ext4",
                 depth=0, image_bytes=MiB, used_bytes=0, created_at=time.time())


def test_store_transactions_roll_back_and_collect_garbage(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    assert store.schema_version == SCHEMA_VERSION
    base = _layer(name="golden")
    mid = _layer(parent=base.id)
    top = _layer(parent=mid.id)
    with store.tx() as tx:
        for layer in (base, mid, top):
            tx.add_layer(layer)
    with pytest.raises(RuntimeError), store.tx() as tx:
        tx.add_layer(_layer())
        raise RuntimeError("boom")
    with store.tx() as tx:
        assert len(tx.layers()) == 3, "a failed transaction leaves nothing behind"
        assert [x.id for x in tx.chain(top.id)] == [top.id, mid.id, base.id]
        gone = tx.collect_garbage()
    assert {x.id for x in gone} == {top.id, mid.id}, "unreferenced chains go, named layers stay"
    store.close()
    reopened = Store(tmp_path / "state.db")  # reference counts are rows: they survive restarts
    with reopened.tx() as tx:
        assert [x.id for x in tx.layers()] == [base.id]
    reopened.close()


def test_store_refuses_a_newer_schema(tmp_path: Path):
    Store(tmp_path / "state.db").close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path / "state.db")


@pytest.mark.parametrize("capacity", [MiB, 16 * MiB, 1 << 30, 10 << 30, 1 << 40])
def test_image_padding_is_modest(capacity: int):
    size = image_size_for(capacity)
    assert capacity < size <= capacity * 1.05 + 64 * MiB


@pytest.mark.parametrize("value", ["", "relative/x", "/a/../b", "/a\x00b", "/" + "a" * 5000])
def test_paths_are_validated(value: str):
    with pytest.raises(InvalidArgument):
        validate.path(value, "target_path")


def test_symlinked_target_is_refused(tmp_path: Path):
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(InvalidArgument):
        validate.path(str(tmp_path / "link"), "target_path")


@pytest.mark.parametrize("text,expected", [("64Mi", 64 * MiB), ("1Gi", 1 << 30), ("500M", 500 * 10**6),
                                           ("4096", 4096)])
def test_quantities(text: str, expected: int):
    assert validate.quantity(text, "size") == expected


def test_bad_quantity():
    with pytest.raises(InvalidArgument):
        validate.quantity("lots", "size")


@pytest.mark.parametrize("value", ["²", "᮲", "٣"])
def test_digits_from_other_scripts_are_not_numbers(value):
    """str.isdigit() says yes to superscripts and other scripts' digits, which int()
    then refuses: untrusted numbers must be ASCII digits (found by the hostile suite)."""
    from csi_driver.layerstore.overlay import tuning
    from csi_driver.service.controller import _token

    with pytest.raises(InvalidArgument):
        tuning.check({"reservedPercent": value}, "ext4")
    from csi_driver.errors import Aborted

    with pytest.raises(Aborted):
        _token(value)
