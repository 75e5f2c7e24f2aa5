"""``serve --backend``: the plain-directory backend is selectable, says loudly that it
enforces no capacity, and what the driver accepts (fs types, raw block volumes, mutable
parameters) follows what the backend offers. A state dir keeps the backend that made it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grpc
import pytest

from csi_driver.cli import main
from csi_driver.client import mount_capability
from csi_driver.engine.engine import BadConfig
from csi_driver.proto import csi_pb2 as csi
from driver_harness import Driver, cleanup, serving

MiB = 1 << 20
Mode = csi.VolumeCapability.AccessMode
RPC = csi.ControllerServiceCapability.RPC


def block_capability() -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
    )


def error_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


def create(d: Driver, name: str, cap=None, parameters=None, mutable=None) -> csi.Volume:
    req = csi.CreateVolumeRequest(
        name=name,
        capacity_range=csi.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[cap or mount_capability()],
        parameters=parameters or {},
        mutable_parameters=mutable or {},
    )
    return d.client.controller.CreateVolume(req, timeout=60).volume


def test_plaindir_refuses_block_volumes_with_invalid_argument(tmp_path: Path):
    with serving(tmp_path, backend="plaindir") as d:
        code, details = error_of(create, d, "raw", cap=block_capability())
        # external-provisioner v6.3.0 (the chart's), controller.go checkError: INVALID_ARGUMENT
        # is ProvisioningFinished, a final failure: nothing runs on in the background, the
        # PVC stays Pending with a ProvisioningFailed event naming the reason
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "keeps no raw block volumes" in details
        # a mount volume is fine; asked whether it could be a block one, the answer is no, with why
        vid = create(d, "files").volume_id
        resp = d.client.controller.ValidateVolumeCapabilities(
            csi.ValidateVolumeCapabilitiesRequest(volume_id=vid, volume_capabilities=[block_capability()])
        )
        assert not resp.HasField("confirmed") and "keeps no raw block volumes" in resp.message
        code, _ = error_of(
            d.client.controller.GetCapacity, csi.GetCapacityRequest(volume_capabilities=[block_capability()])
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [x.id for x in d.engine.list_volumes(0, 10)] == [vid], "the refusal made nothing"


@pytest.mark.parametrize("backend,default,foreign", [("plaindir", "dir", "ext4"), ("overlay", "ext4", "dir")])
def test_fs_types_follow_the_backend(tmp_path: Path, backend: str, default: str, foreign: str):
    with serving(tmp_path, backend=backend) as d:
        unnamed = create(d, "unnamed").volume_id
        assert d.engine.get_volume(unnamed).fs_type == default
        named = create(d, "named", cap=mount_capability(fs_type=default)).volume_id
        assert d.engine.get_volume(named).fs_type == default
        for kw in ({"cap": mount_capability(fs_type=foreign)}, {"parameters": {"fsType": foreign}}):
            code, details = error_of(create, d, "foreign", **kw)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{foreign!r} is not supported" in details and repr(default) in details
        # GetCapacity as the provisioner's capacity controller asks it (a legacy fsType only)
        code, _ = error_of(
            d.client.controller.GetCapacity, csi.GetCapacityRequest(parameters={"fsType": foreign})
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        ok = d.client.controller.GetCapacity(csi.GetCapacityRequest(parameters={"fsType": default}))
        assert ok.available_capacity > 0


@pytest.mark.parametrize("backend", ["plaindir", "overlay"])
def test_mutable_parameters_follow_the_backend(tmp_path: Path, backend: str):
    with serving(tmp_path, backend=backend) as d:
        caps = d.client.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest())
        advertised = {c.rpc.type for c in caps.capabilities}
        assert (RPC.MODIFY_VOLUME in advertised) == (backend == "overlay")
        if backend == "overlay":
            vid = create(d, "tuned", mutable={"readAheadKiB": "512"}).volume_id
            assert d.engine.get_volume(vid).mutable == {"readAheadKiB": "512"}
            code, details = error_of(create, d, "bad", mutable={"readAheadKiB": "lots"})
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "readAheadKiB" in details
            return
        code, details = error_of(create, d, "tuned", mutable={"readAheadKiB": "512"})
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "no parameters to modify" in details
        vid = create(d, "plain").volume_id
        code, _ = error_of(
            d.client.controller.ControllerModifyVolume,
            csi.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"readAheadKiB": "512"}),
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert d.engine.get_volume(vid).mutable == {}, "nothing recorded"


def test_plaindir_serves_files_and_warns_it_enforces_no_capacity(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="csi_driver.server")
    with serving(tmp_path, backend="plaindir") as d:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("ENFORCES NO CAPACITY" in m for m in warnings), warnings
        vid, staging, target = d.published("files", 8 * MiB)
        (target / "data").write_bytes(os.urandom(MiB))
        assert (staging / "data").read_bytes() == (target / "data").read_bytes()
        assert d.engine.backend.devices() == 0, "plain directories hold no loop devices"
        d.client.unpublish(vid, target)
        d.client.unstage(vid, staging)
        d.client.delete_volume(vid)
    caplog.clear()
    (tmp_path / "overlay").mkdir()
    with serving(tmp_path / "overlay"):
        assert not [r for r in caplog.records if "ENFORCES NO CAPACITY" in r.getMessage()]


def test_a_state_dir_keeps_the_backend_that_made_its_layers(tmp_path: Path):
    with serving(tmp_path, backend="plaindir") as d:
        create(d, "kept")
    with pytest.raises(BadConfig, match="--backend plaindir"):
        Driver(tmp_path, backend="overlay")
    assert cleanup(tmp_path) == ([], [])
    with serving(tmp_path, backend="plaindir") as d:  # the refusal released the state dir
        assert [v.name for v in d.engine.list_volumes(0, 10)] == ["kept"]
        d.client.delete_volume(d.engine.list_volumes(0, 10)[0].id)
    with serving(tmp_path, backend="overlay") as d:  # no layers left: it may change backend
        assert d.engine.backend.capabilities.block
    assert (tmp_path / "state" / "backend").read_text().strip() == "overlay"


def test_doctor_says_plaindir_enforces_no_capacity(tmp_path: Path, capsys):
    def backend_check(*argv: str) -> dict:
        main(["doctor", "--json", "--no-probe", "--in-pod", "no", "--state-dir", str(tmp_path), *argv])
        checks = json.loads(capsys.readouterr()[0])["checks"]
        return next(c for c in checks if c["name"] == "backend")

    check = backend_check("--backend", "plaindir")
    assert check["status"] == "WARN" and "ENFORCES NO CAPACITY" in check["message"]
    assert backend_check()["status"] == "OK"  # nothing recorded: the default, overlay
    (tmp_path / "backend").write_text("plaindir\n")
    assert "ENFORCES NO CAPACITY" in backend_check()["message"]  # what the state dir records
    check = backend_check("--backend", "overlay")
    assert check["status"] == "WARN" and "records the plaindir backend" in check["message"]
