"""The gRPC server: one unix socket, three services, a single instance per state dir."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver import __version__, host, pool, pool_file
from csi_driver.engine.capacity import CapacityPolicy, Share, Space
from csi_driver.engine.capture import DEFAULT_MAX_LIVE_COPY
from csi_driver.engine.engine import BadConfig, Engine, EngineConfig
from csi_driver.engine.reconcile import reconcile
from csi_driver.engine.transfers import snapshot_reference
from csi_driver.errors import Aborted
from csi_driver.kube.api import KubeApi, connect
from csi_driver.kube.contents import ContentAdopter
from csi_driver.kube.modify_relay import ModifyRelay, ModifyWatcher
from csi_driver.kube.periodic import Periodic
from csi_driver.layerstore.backends import DEFAULT as DEFAULT_BACKEND
from csi_driver.pool_file import DEFAULT_HOST_RESERVE, HostBoundSpace
from csi_driver.proto import csi_pb2_grpc
from csi_driver.service.central import CentralControllerServicer
from csi_driver.service.context import DriverContext
from csi_driver.service.controller import ControllerServicer
from csi_driver.service.group import GroupControllerServicer
from csi_driver.service.identity import IdentityServicer
from csi_driver.service.node import NodeServicer
from csi_driver.service.pending_deletes import DeleteRetrier
from csi_driver.service.registry_pool import TRANSFER_TIMEOUT, RegistryPool
from csi_driver.statedir import StateDir

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 << 20
MAX_CONCURRENT_RPCS = 64
WORKERS = 16
STORAGE_WATCH_SECONDS = 10.0
STOP_TRANSFERS_SECONDS = 3.0  # at stop, cancelled registry transfers get this long to clean up
STORAGE_WATCH_LOW_SECONDS = 2.0  # and checkpoint the volumes each time
LOCK_WAIT_SECONDS = 5.0  # a state dir's lock still held at start is waited for this long
RATION_SECONDS = 0.25  # how often the volumes' shares of the free space are looked at
RATION_LIMITED_SECONDS = 0.05  # and while they are limited (a fast writer outruns a slow look)


class AlreadyRunning(RuntimeError):
    pass


@dataclass
class ServeOptions:
    endpoint: str
    state_dir: Path
    node_id: str
    driver_name: str = "overlay.csi.dev"
    max_volumes_per_node: int = 0
    max_volume_size: int = 0
    max_ephemeral_size: int = EngineConfig.max_ephemeral_size  # all inline volumes together; 0: none
    max_snapshots_per_volume: int = 0  # 0: no limit
    max_layer_depth: int = EngineConfig.max_depth
    backend: str = DEFAULT_BACKEND  # how layers are kept (layerstore.backends)
    default_fs_type: str = EngineConfig.fs_type  # "": the backend's default
    hidden_capabilities: tuple[str, ...] = ()
    mode: str = "all"  # or "controller-expand"
    drain_seconds: float = 30.0
    kubelet_dir: str = ""  # confine node paths under it ("" = anywhere)
    metrics_address: str = ""  # HOST:PORT for Prometheus metrics; "" = off
    pool_device: str = ""  # a disk to format (xfs, reflink) and mount as the state dir
    pool_device_wipe: bool = False  # format it even when it holds another file system
    pool_file: str = ""  # a sparse file on the host made the pool (xfs, reflink) mounted as the state dir
    pool_file_size: int = 0  # of a new pool file; 0: the host file system's size
    host_reserve: Share = DEFAULT_HOST_RESERVE  # of the pool file's host file system, never given out
    max_live_snapshot_copy: int = DEFAULT_MAX_LIVE_COPY  # the most a snapshot in use may copy; 0: no limit
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)  # what the node may promise
    insecure_registries: frozenset[str] = frozenset()  # registry hosts reached over plain HTTP
    registry_transfer_timeout: float = TRANSFER_TIMEOUT  # seconds a pull or push may run, callers or not
    kubernetes: str = "auto"  # the in-cluster API when there is one ("off": never)
    kube_api: KubeApi | None = None  # given instead of connecting (tests)
    registry_snapshotter_node: str = ""  # label pre-provisioned exported contents for this name

    def engine_config(self, space: Space | None = None) -> EngineConfig:
        """The engine's settings: the one place serving options become an ``EngineConfig``
        (``space``: where layers are kept, when a pool file bounds it)."""
        return EngineConfig(
            state_dir=self.state_dir,
            node_id=self.node_id,
            max_volumes=self.max_volumes_per_node,
            max_volume_size=self.max_volume_size,
            max_ephemeral_size=self.max_ephemeral_size,
            max_snapshots_per_volume=self.max_snapshots_per_volume,
            max_depth=self.max_layer_depth,
            fs_type=self.default_fs_type,
            backend=self.backend,
            capacity=self.capacity,
            insecure_registries=self.insecure_registries,
            space=space,
            max_live_copy=self.max_live_snapshot_copy,
        )


def socket_path(endpoint: str) -> Path:
    if endpoint.startswith("unix://"):
        endpoint = endpoint[len("unix://") :]
    if not endpoint.startswith("/"):
        raise ValueError("endpoint must be unix:///absolute/path.sock")
    return Path(endpoint)


def lock_state_dir(state_dir: Path, wait: float = LOCK_WAIT_SECONDS) -> int:
    """Hold an exclusive lock on the state dir for the process lifetime. A lock still
    held is waited for ``wait`` seconds: a driver killed a moment ago may have left a
    child between fork and exec, which holds the lock until it execs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = StateDir(state_dir).lockfile
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError as e:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            pid = lock.read_text().strip() or "?"
            raise AlreadyRunning(
                f"another overlay-csi (pid {pid}) is serving state dir {state_dir}; refusing to start"
            ) from e
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Server:
    def __init__(self, opts: ServeOptions, engine: Engine | None = None) -> None:
        self.opts = opts
        space: Space | None = None
        self.pool_file: pool_file.Prepared | None = None
        if opts.pool_device:
            pool.prepare(opts.pool_device, opts.state_dir, opts.pool_device_wipe)
        elif opts.pool_file:
            self.pool_file = pool_file.prepare(Path(opts.pool_file), opts.state_dir, opts.pool_file_size)
            if self.pool_file.pooled:
                space = HostBoundSpace(opts.state_dir, Path(opts.pool_file), opts.host_reserve)
        self._lock_fd = lock_state_dir(opts.state_dir)
        # node paths under the kubelet dir resolve beneath its pods/ and plugins/ (host.beneath)
        host.beneath.confine(opts.kubelet_dir)
        host.beneath.add_root(str(opts.state_dir))
        try:
            self.engine = engine or Engine(opts.engine_config(space))
        except BadConfig:
            os.close(self._lock_fd)  # refused: nothing holds the state dir
            raise
        if not self.engine.backend.capabilities.enforces_capacity:
            log.warning(
                "THE %s LAYER BACKEND ENFORCES NO CAPACITY: a volume may write past its size until "
                "the state dir's file system is full, and fill it for every other volume and the "
                "host. Use it on development clusters only; the overlay backend enforces capacity",
                self.engine.backend.name.upper(),
            )
        report = reconcile(self.engine)
        log.info("reconciled state dir %s: %s", opts.state_dir, report)
        self.ctx = DriverContext(
            engine=self.engine,
            driver_name=opts.driver_name,
            node_id=opts.node_id,
            version=__version__,
            max_volumes_per_node=opts.max_volumes_per_node,
            hidden_capabilities=frozenset(opts.hidden_capabilities),
            kubelet_dir=opts.kubelet_dir,
            registry=RegistryPool(transfer_timeout=opts.registry_transfer_timeout),
        )
        self.metrics = None
        if opts.metrics_address:
            from csi_driver.metrics import Metrics  # needs the 'metrics' extra

            self.metrics = Metrics(self.engine, opts.driver_name, opts.node_id, __version__)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="rpc"),
            interceptors=self.metrics.interceptors() if self.metrics else None,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(self.ctx), self.grpc)
        self.kube = opts.kube_api or connect(opts.kubernetes)
        # exported snapshots' manifests whose deletion waits for their registry, in either mode
        self.background: list[Periodic] = [DeleteRetrier(self.engine, self.ctx.registry)]
        if opts.mode == "controller-expand":
            relay = ModifyRelay(self.kube, opts.driver_name) if self.kube else None
            central = CentralControllerServicer(self.ctx, relay)
            csi_pb2_grpc.add_ControllerServicer_to_server(central, self.grpc)
            if self.kube and opts.registry_snapshotter_node:
                self.background.append(
                    ContentAdopter(
                        self.kube,
                        opts.driver_name,
                        opts.registry_snapshotter_node,
                        lambda handle: snapshot_reference(handle) is not None,
                    )
                )
        else:
            if self.kube:
                self.background.append(
                    ModifyWatcher(self.kube, opts.driver_name, opts.node_id, self._apply_modification)
                )
            csi_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(self.ctx), self.grpc)
            csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(self.ctx), self.grpc)
            csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerServicer(self.ctx), self.grpc)
        self.socket = socket_path(opts.endpoint)
        self._stopped = threading.Event()
        self._watch = threading.Thread(target=self._watch_storage, name="storage-watch", daemon=True)
        self._ration = threading.Thread(target=self._ration_storage, name="storage-ration", daemon=True)

    def start(self) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() or self.socket.is_symlink():
            if not stat.S_ISSOCK(self.socket.lstat().st_mode):
                raise RuntimeError(f"{self.socket} exists and is not a socket")
            log.info("replacing stale socket %s", self.socket)
            self.socket.unlink()
        self.grpc.add_insecure_port(f"unix://{self.socket}")
        if self.metrics:
            addr = self.metrics.serve(self.opts.metrics_address)
            log.info("serving metrics on http://%s:%d/metrics", *addr)
        self.grpc.start()
        self._watch.start()
        self._ration.start()
        for worker in self.background:
            worker.start()
        os.chmod(self.socket, 0o660)
        log.info(
            "serving %s %s as node %s on %s",
            self.opts.driver_name,
            __version__,
            self.opts.node_id,
            self.socket,
        )

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish, release everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.ctx.ready = False
        # registry transfers (those in the background too) are cancelled, not drained: a
        # registry that hangs must not hold the stop (their callers retry); the threads are
        # daemons and get a few seconds to remove what they built, the rest goes at the next
        # start with tmp/
        self.ctx.registry.close(wait=STOP_TRANSFERS_SECONDS)
        self.grpc.stop(self.opts.drain_seconds if grace is None else grace).wait()
        for worker in self.background:
            worker.stop()
        if self._watch.is_alive():  # not in the middle of a checkpoint when the engine closes
            self._watch.join()
        if self._ration.is_alive():
            self._ration.join()
        if self.metrics:
            self.metrics.close()
        self.engine.close()
        self.socket.unlink(missing_ok=True)
        os.close(self._lock_fd)
        log.info("stopped")

    def _apply_modification(self, volume_id: str, parameters: dict[str, str]) -> None:
        """A VolumeAttributesClass change relayed from the central resizer: the node's own
        ControllerModifyVolume, with its guard."""
        with self.ctx.locks.try_hold(volume_id) as owned:
            if not owned:
                raise Aborted(f"an operation on {volume_id} is already in progress")
            self.engine.modify_volume(volume_id, parameters)

    def _watch_storage(self) -> None:
        """Read the free space now and then, so entering and leaving the low-space
        state is logged even while no call asks; while low, checkpoint the volumes."""
        low = False
        while not self._stopped.wait(STORAGE_WATCH_LOW_SECONDS if low else STORAGE_WATCH_SECONDS):
            try:
                low = self.engine.capacity.watch()
            except Exception:  # never let the watch die of a passing error
                log.exception("watching the state dir's free space failed")

    def _ration_storage(self) -> None:
        """Share the free space out among the writable volumes (``Capacity.ration``)."""
        limited = False
        while not self._stopped.wait(RATION_LIMITED_SECONDS if limited else RATION_SECONDS):
            try:
                limited = self.engine.capacity.ration().limited
            except Exception:  # never let it die of a passing error
                log.exception("sharing the free space out among the volumes failed")

    def serve_forever(self) -> None:
        done = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %s: draining", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        done.wait()
        self.stop()
