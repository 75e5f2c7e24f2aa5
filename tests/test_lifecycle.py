"""The core lifecycle with real mounts: create, stage, publish, write, read back,
unpublish, unstage, delete; capacity; idempotency and status codes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.client import mount_capability
from csi_driver.proto import csi_pb2 as csi
from driver_harness import Driver

MiB = 1 << 20
GiB = 1 << 30
Mode = csi.VolumeCapability.AccessMode


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code()


def test_full_lifecycle(driver: Driver):
    c = driver.client
    vol = c.create_volume("pv-1", 64 * MiB)
    assert vol.capacity_bytes == 64 * MiB
    assert dict(vol.accessible_topology[0].segments) == {"topology.overlay.csi.dev/node": "node-1"}
    staging, target = driver.paths("pv-1")
    c.stage(vol.volume_id, staging)
    assert host.mount_at(staging).fstype == "overlay"
    c.publish(vol.volume_id, staging, target)
    (target / "file").write_text("hello")
    assert (staging / "file").read_text() == "hello"
    c.unpublish(vol.volume_id, target)
    assert not target.exists(), "NodeUnpublish removes the target it created"
    c.unstage(vol.volume_id, staging)
    assert not host.is_mounted(staging)
    assert not host.mounts_under(driver.state), "no layer stays mounted once nothing is staged"
    c.stage(vol.volume_id, staging)
    assert (staging / "file").read_text() == "hello", "data survives unstage and stage"
    c.unstage(vol.volume_id, staging)
    c.delete_volume(vol.volume_id)
    assert list(driver.engine.backend.layout.layers.iterdir()) == []
    assert code_of(c.controller.ControllerGetVolume,
                   csi.ControllerGetVolumeRequest(volume_id=vol.volume_id)) == grpc.StatusCode.NOT_FOUND


def test_capacity_is_enforced_with_enospc(driver: Driver):
    c = driver.client
    vol = c.create_volume("small", 32 * MiB)
    staging, target = driver.paths("small")
    c.stage(vol.volume_id, staging)
    c.publish(vol.volume_id, staging, target)
    st = os.statvfs(target)
    assert 32 * MiB <= st.f_bavail * st.f_frsize < 40 * MiB, "df shows the volume, not the host"
    chunk = b"x" * MiB
    with pytest.raises(OSError) as e:
        with open(target / "fill", "wb") as f:
            for _ in range(64):
                f.write(chunk)
                f.flush()
            os.fsync(f.fileno())
    assert e.value.errno == errno.ENOSPC
    written = (target / "fill").stat().st_size
    assert 30 * MiB <= written <= 40 * MiB
    stats = c.stats(vol.volume_id, target)
    used = {u.unit: u for u in stats.usage}[csi.VolumeUsage.BYTES]
    assert used.used >= 30 * MiB and used.total < 48 * MiB, "stats are the volume's own"
    (target / "fill").unlink()
    c.unpublish(vol.volume_id, target)
    c.unstage(vol.volume_id, staging)
    c.delete_volume(vol.volume_id)


def test_space_is_allocated_on_write(driver: Driver):
    vol = driver.client.create_volume("big", 10 * GiB)
    assert vol.capacity_bytes == 10 * GiB
    assert driver.engine.disk_usage() < 10 * MiB, "a fresh 10 GiB volume costs under 10 MiB"
    driver.client.delete_volume(vol.volume_id)


def test_create_is_idempotent_by_name(driver: Driver):
    c = driver.client
    a = c.create_volume("same", 100 * MiB)
    b = c.create_volume("same", 100 * MiB)
    assert a.volume_id == b.volume_id
    assert code_of(c.create_volume, "same", 200 * MiB) == grpc.StatusCode.ALREADY_EXISTS
    c.delete_volume(a.volume_id)
    c.delete_volume(a.volume_id)  # idempotent
    c.delete_volume("vol-" + "0" * 32)  # never existed: OK


def test_capacity_range_rules(driver: Driver):
    ctl = driver.client.controller
    cap = [mount_capability()]

    def create(name, req, lim):
        return ctl.CreateVolume(csi.CreateVolumeRequest(
            name=name, volume_capabilities=cap,
            capacity_range=csi.CapacityRange(required_bytes=req, limit_bytes=lim)))

    assert code_of(create, "r1", 200 * MiB, 100 * MiB) == grpc.StatusCode.OUT_OF_RANGE
    exact = create("r2", 10 * MiB + 5, 10 * MiB + 5).volume
    assert exact.capacity_bytes == 10 * MiB + 5, "required == limit is honoured exactly"
    assert create("r3", 0, 0).volume.capacity_bytes == GiB, "default size"
    assert create("r4", 0, 50 * MiB).volume.capacity_bytes == 50 * MiB
    free = driver.engine.free_bytes()
    assert code_of(create, "r5", free * 2, 0) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_volume_size_and_count(tmp_path: Path):
    from driver_harness import cleanup, make_driver

    d = make_driver(tmp_path, max_volumes_per_node=2, max_volume_size=100 * MiB)
    try:
        c = d.client
        assert code_of(c.create_volume, "huge", 200 * MiB) == grpc.StatusCode.OUT_OF_RANGE
        vols = [c.create_volume(n, 10 * MiB).volume_id for n in "abc"]  # creating is not using
        info = c.node.NodeGetInfo(csi.NodeGetInfoRequest())
        assert info.max_volumes_per_node == 2
        stagings = [d.paths(n)[0] for n in "abc"]
        c.stage(vols[0], stagings[0])
        c.stage(vols[1], stagings[1])
        c.stage(vols[1], stagings[1])  # a repeat is not a new volume
        assert code_of(c.stage, vols[2], stagings[2]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not host.is_mounted(stagings[2]), "a refused stage changes nothing"
        c.unstage(vols[0], stagings[0])
        c.stage(vols[2], stagings[2])
        c.unstage(vols[1], stagings[1])
        c.unstage(vols[2], stagings[2])
    finally:
        d.stop()
        cleanup(tmp_path)


def test_attach_limit_at_controller_publish(tmp_path: Path):
    """--max-volumes-per-node is enforced at ControllerPublishVolume too: a third attachment to
    the node is RESOURCE_EXHAUSTED and not recorded; a repeat of an existing one is not a new
    volume; once one is unpublished the third fits."""
    from driver_harness import cleanup, make_driver, store_dump

    d = make_driver(tmp_path, max_volumes_per_node=2)
    try:
        c = d.client
        vols = [c.create_volume(n, 10 * MiB).volume_id for n in "abc"]

        def attach(vid: str, readonly: bool = False):
            return c.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
                volume_id=vid, node_id="node-1", volume_capability=mount_capability(), readonly=readonly))

        def attached() -> list[str]:
            return sorted(r["volume_id"] for r in store_dump(d.state)["attachments"])

        def published_nodes(vid: str) -> list[str]:
            got = c.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid))
            return list(got.status.published_node_ids)

        attach(vols[0])
        attach(vols[1])
        attach(vols[1])  # a repeat is not a new volume
        assert attached() == sorted(vols[:2])
        assert code_of(attach, vols[2]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert attached() == sorted(vols[:2]), "a refused attach is not recorded"
        assert published_nodes(vols[2]) == []
        c.controller.ControllerUnpublishVolume(
            csi.ControllerUnpublishVolumeRequest(volume_id=vols[0], node_id="node-1"))
        assert published_nodes(vols[0]) == []
        attach(vols[2])
        assert published_nodes(vols[2]) == ["node-1"]
        assert attached() == sorted(vols[1:])
        for vid in vols[1:]:
            c.controller.ControllerUnpublishVolume(
                csi.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-1"))
        assert attached() == []
    finally:
        d.stop()
        cleanup(tmp_path)


def test_growth_past_the_nodes_storage_is_out_of_range(driver: Driver):
    """An expansion the node cannot hold (up to sizes no file may have) is OUT_OF_RANGE at
    the controller and at the node, and changes nothing; found by the randomized hostile suite
    (it was INTERNAL: the image's truncate failed with EFBIG or OverflowError)."""
    c = driver.client
    vid = c.create_volume("g", 16 * MiB).volume_id
    staging, target = driver.paths("g")
    for size in (driver.engine.free_bytes() + 32 * MiB, 1 << 62, (1 << 63) - 1):
        grow = csi.CapacityRange(required_bytes=size)
        req = csi.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=grow)
        assert code_of(c.controller.ControllerExpandVolume, req) == grpc.StatusCode.OUT_OF_RANGE, size
    c.stage(vid, staging)
    for size in (1 << 62, (1 << 63) - 1):
        req = csi.NodeExpandVolumeRequest(volume_id=vid, volume_path=str(staging),
                                          capacity_range=csi.CapacityRange(required_bytes=size))
        assert code_of(c.node.NodeExpandVolume, req) == grpc.StatusCode.OUT_OF_RANGE, size
    got = c.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid))
    assert got.volume.capacity_bytes == 16 * MiB
    image = driver.engine.backend.layout.image(driver.engine.get_volume(vid).upper)
    assert image.stat().st_size < 64 * MiB, "the image was not grown"
    c.unstage(vid, staging)
    c.delete_volume(vid)


def test_node_paths_with_control_characters_are_refused(driver: Driver):
    """A staging or target path with a control character is INVALID_ARGUMENT and nothing is
    mounted: a mount at a path with a carriage return splits its /proc/self/mountinfo line
    for line readers, and every later call crashed (found by the randomized hostile suite)."""
    c = driver.client
    vid = c.create_volume("ctl", 16 * MiB).volume_id
    staging, _ = driver.paths("ctl")
    for bad in ("\r", "\n", "\t", "\x1b", "\x7f"):
        odd = driver.kubelet / f"odd{bad}dir"
        assert code_of(c.stage, vid, odd) == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
    c.stage(vid, staging)
    target = driver.kubelet / "pods" / "p\rq" / "mount"
    assert code_of(c.publish, vid, staging, target) == grpc.StatusCode.INVALID_ARGUMENT
    assert [m.target for m in host.mounts_under(driver.kubelet)] == [str(staging)]
    c.unstage(vid, staging)
    c.delete_volume(vid)


def test_refused_inline_publish_leaves_no_volume(driver: Driver):
    """An inline (ephemeral) NodePublishVolume at a target another volume is published at is
    ALREADY_EXISTS and changes nothing: the inline volume it made for the pod is gone again,
    not left staged where nothing would ever delete it (found by the randomized hostile
    suite). A later publish of the same handle at a free target works."""
    from driver_harness import disk_dump, leftovers, store_dump

    c = driver.client
    vid = c.create_volume("taken", 16 * MiB).volume_id
    staging, target = driver.paths("taken")
    c.stage(vid, staging)
    c.publish(vid, staging, target)
    before = store_dump(driver.state), disk_dump(driver.state), leftovers(driver.state)
    inline = csi.NodePublishVolumeRequest(
        volume_id="csi-inline", target_path=str(target), volume_capability=mount_capability(),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "size": "16Mi"})
    assert code_of(c.node.NodePublishVolume, inline) == grpc.StatusCode.ALREADY_EXISTS
    assert (store_dump(driver.state), disk_dump(driver.state), leftovers(driver.state)) == before
    assert not any((driver.state / "ephemeral").iterdir())
    free = driver.kubelet / "pods" / "inline" / "mount"
    free.parent.mkdir(parents=True)
    inline.target_path = str(free)
    c.node.NodePublishVolume(inline)
    assert host.mount_at(free).fstype == "overlay"
    c.unpublish("csi-inline", free)
    assert store_dump(driver.state)["volumes"] == before[0]["volumes"], "unpublish deletes the inline volume"
    c.unpublish(vid, target)
    c.unstage(vid, staging)
    c.delete_volume(vid)


def test_topology_that_excludes_this_node(driver: Driver):
    req = csi.CreateVolumeRequest(name="topo", volume_capabilities=[mount_capability()])
    req.accessibility_requirements.requisite.add().segments["topology.overlay.csi.dev/node"] = "node-2"
    assert code_of(driver.client.controller.CreateVolume, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
    req.accessibility_requirements.requisite.add().segments["topology.overlay.csi.dev/node"] = "node-1"
    assert driver.client.controller.CreateVolume(req).volume.volume_id


def test_unsupported_modes_are_refused_at_create(driver: Driver):
    cap = mount_capability(Mode.MULTI_NODE_MULTI_WRITER)
    assert code_of(driver.client.create_volume, "mnmw", MiB, cap=cap) == grpc.StatusCode.INVALID_ARGUMENT
    bad_fs = mount_capability(fs_type="vfat")
    assert code_of(driver.client.create_volume, "vfat", MiB, cap=bad_fs) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(driver.client.create_volume, "p", MiB, parameters={"nope": "1"}) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_list_volumes_pagination_survives_changes(driver: Driver):
    c = driver.client
    ids = [c.create_volume(f"v{i}", MiB).volume_id for i in range(5)]
    page = c.controller.ListVolumes(csi.ListVolumesRequest(max_entries=2))
    assert [e.volume.volume_id for e in page.entries] == ids[:2] and page.next_token
    c.delete_volume(ids[1])  # the last volume of the page goes away
    new = c.create_volume("v5", MiB).volume_id
    rest = c.controller.ListVolumes(csi.ListVolumesRequest(starting_token=page.next_token))
    assert [e.volume.volume_id for e in rest.entries] == ids[2:] + [new]
    assert rest.next_token == ""
    bad = csi.ListVolumesRequest(starting_token="garbage")
    assert code_of(c.controller.ListVolumes, bad) == grpc.StatusCode.ABORTED


def test_get_capacity_is_what_the_node_can_still_promise(driver: Driver):
    def cap() -> int:
        return driver.client.controller.GetCapacity(csi.GetCapacityRequest()).available_capacity

    st = os.statvfs(driver.state)
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    # the free space less the 1% reserve, as one volume's capacity (its image pads ~2% + journal)
    assert (free - size // 100) * 0.95 < cap() <= free - size // 100
    promised = driver.engine.capacity.figures().promised
    vol = driver.client.create_volume("promised", GiB)
    grown = driver.engine.capacity.figures().promised - promised
    assert grown >= GiB, "a new volume's whole capacity is promised, not its few written MiB"
    driver.client.delete_volume(vol.volume_id)
    assert driver.engine.capacity.figures().promised == promised


def test_node_idempotency_and_conflicts(driver: Driver):
    c = driver.client
    vol = c.create_volume("idem", 16 * MiB)
    staging, target = driver.paths("idem")
    for _ in range(3):
        c.stage(vol.volume_id, staging)
    for _ in range(3):
        c.publish(vol.volume_id, staging, target)
    assert len([m for m in host.mounts() if m.target == str(target)]) == 1
    assert code_of(c.publish, vol.volume_id, staging, target, readonly=True) == \
        grpc.StatusCode.ALREADY_EXISTS
    other_staging, _ = driver.paths("elsewhere")
    assert code_of(c.stage, vol.volume_id, other_staging) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(c.controller.DeleteVolume, csi.DeleteVolumeRequest(volume_id=vol.volume_id)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    for _ in range(2):
        c.unpublish(vol.volume_id, target)
    for _ in range(2):
        c.unstage(vol.volume_id, staging)
    c.delete_volume(vol.volume_id)


def test_readonly_publish(driver: Driver):
    c = driver.client
    vol = c.create_volume("ro", 16 * MiB)
    staging, target = driver.paths("ro")
    c.stage(vol.volume_id, staging)
    c.publish(vol.volume_id, staging, target, readonly=True)
    with pytest.raises(OSError) as e:
        (target / "x").write_text("no")
    assert e.value.errno == errno.EROFS
    (staging / "y").write_text("staging stays writable")
    c.unpublish(vol.volume_id, target)
    c.unstage(vol.volume_id, staging)


def test_error_codes(driver: Driver):
    c = driver.client
    ctl, node = c.controller, c.node
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    assert code_of(ctl.CreateVolume, csi.CreateVolumeRequest(volume_capabilities=[mount_capability()])) == IA
    assert code_of(ctl.CreateVolume, csi.CreateVolumeRequest(name="x")) == IA
    assert code_of(ctl.DeleteVolume, csi.DeleteVolumeRequest()) == IA
    assert code_of(ctl.ValidateVolumeCapabilities, csi.ValidateVolumeCapabilitiesRequest(
        volume_id="nope", volume_capabilities=[mount_capability()])) == NF
    assert code_of(c.stage, "vol-" + "1" * 32, "/tmp/x") == NF
    assert code_of(c.stage, "vol-" + "1" * 32, "relative/path") == IA
    assert code_of(c.stage, "vol-" + "1" * 32, "/tmp/../etc") == IA
    assert code_of(c.stats, "vol-" + "1" * 32, "some/path") == NF
    vol = c.create_volume("codes", 16 * MiB)
    assert code_of(c.stats, vol.volume_id, "some/path") == NF
    staging, target = driver.paths("codes")
    assert code_of(c.publish, vol.volume_id, staging, target) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(node.NodePublishVolume, csi.NodePublishVolumeRequest(
        volume_id=vol.volume_id, target_path=str(target), staging_target_path=str(staging))) == IA
    assert code_of(ctl.CreateVolume, csi.CreateVolumeRequest(
        name="from-nothing", volume_capabilities=[mount_capability()],
        volume_content_source=csi.VolumeContentSource(
            snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id="snap-missing")))) == NF


def test_volume_condition_turns_abnormal_when_mount_is_gone(driver: Driver):
    c = driver.client
    vol = c.create_volume("cond", 16 * MiB)
    staging, target = driver.paths("cond")
    c.stage(vol.volume_id, staging)
    c.publish(vol.volume_id, staging, target)
    assert not c.stats(vol.volume_id, target).volume_condition.abnormal
    host.umount(target)  # behind the driver's back
    st = c.stats(vol.volume_id, target)
    assert st.volume_condition.abnormal and "not mounted" in st.volume_condition.message
    c.unpublish(vol.volume_id, target)
    c.unstage(vol.volume_id, staging)


def test_aborted_while_an_operation_is_in_flight(driver: Driver):
    with driver.server.ctx.locks.try_hold("vol-" + "2" * 32):
        assert code_of(driver.client.controller.DeleteVolume,
                       csi.DeleteVolumeRequest(volume_id="vol-" + "2" * 32)) == grpc.StatusCode.ABORTED


def test_identity(driver: Driver):
    ident = driver.client.identity
    info = ident.GetPluginInfo(csi.GetPluginInfoRequest())
    from csi_driver import __version__
    assert (info.name, info.vendor_version) == ("overlay.csi.dev", __version__)
    assert ident.Probe(csi.ProbeRequest()).ready.value is True
    caps = ident.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest()).capabilities
    services = {x.service.type for x in caps if x.HasField("service")}
    assert services == {csi.PluginCapability.Service.CONTROLLER_SERVICE,
                        csi.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
                        csi.PluginCapability.Service.GROUP_CONTROLLER_SERVICE}


def test_kubelet_dir_confines_node_paths(tmp_path: Path):
    """With --kubelet-dir, a path whose parent is a symlink out of it is refused."""
    from driver_harness import cleanup, make_driver

    d = make_driver(tmp_path, kubelet_dir=str(tmp_path / "kubelet"))
    try:
        c = d.client
        vol = c.create_volume("confined", 16 * MiB)
        escape = tmp_path / "kubelet" / "escape"
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        escape.symlink_to(outside)
        assert code_of(c.stage, vol.volume_id, escape / "globalmount") == grpc.StatusCode.INVALID_ARGUMENT
        assert not (outside / "globalmount").exists(), "a refused call writes nothing"
        staging = tmp_path / "kubelet/plugins/kubernetes.io/csi/overlay.csi.dev" / ("0" * 64) / "globalmount"
        staging.parent.mkdir(parents=True)
        c.stage(vol.volume_id, staging)
        c.unstage(vol.volume_id, staging)
    finally:
        d.stop()
        cleanup(tmp_path)


def test_a_mount_over_another_volumes_path_is_refused(driver):
    """Staging or publishing over a parent of another volume's staging path would hide
    that volume from kubelet and from the driver: FAILED_PRECONDITION, nothing mounted."""
    c = driver.client
    a = c.create_volume("a", 16 * MiB).volume_id
    b = c.create_volume("b", 16 * MiB).volume_id
    staging, target = driver.paths("a")
    c.stage(a, staging)
    c.publish(a, staging, target)
    b_staging, _ = driver.paths("b")
    for call in (lambda: c.stage(b, staging.parent), lambda: c.publish(a, staging, staging.parent)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "would hide it" in e.value.details()
    assert not host.is_mounted(staging.parent)
    c.stage(b, b_staging)  # a path of its own is fine
    c.unstage(b, b_staging)
    c.unpublish(a, target)
    c.unstage(a, staging)


def test_unpublishing_the_staging_path_is_refused_and_unmounts_nothing(driver):
    """NodeUnpublishVolume of the staging path itself would unmount the overlay and
    leave its layers held by no mount (found by the hostile-input suite)."""
    c = driver.client
    vid = c.create_volume("u", 16 * MiB).volume_id
    staging, target = driver.paths("u")
    c.stage(vid, staging)
    with pytest.raises(grpc.RpcError) as e:
        c.unpublish(vid, staging)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert host.is_mounted(staging)
    c.unstage(vid, staging)
