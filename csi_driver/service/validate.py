"""Request validation shared by the servicers. Everything from a caller is untrusted."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from csi_driver.errors import InvalidArgument
from csi_driver.ids import NODE_PATTERN
from csi_driver.layerstore.backend import Capabilities
from csi_driver.proto import csi_pb2 as csi
from csi_driver.registry import codec
from csi_driver.registry.reference import (
    HOST_PATTERN,
    PATH_PATTERN,
    BadReference,
    Reference,
    Repository,
    looks_like_reference,
)

MAX_NAME = 256
MAX_PATH = 4096
MAX_MAP_ENTRIES = 64
MAX_VALUE = 4096
# ids this driver issued: optionally tagged with the node that made them (csi_driver.ids)
VOLUME_ID_RE = re.compile(rf"^vol-[0-9a-f]{{32}}(?:@{NODE_PATTERN})?$")
# a local snapshot's id (node-tagged or not), or an exported one's: the reference of its
# artifact (REPOSITORY:snap-...), which any node can restore
SNAPSHOT_ID_RE = re.compile(
    rf"^(?:snap-[0-9a-f]{{32}}(?:@{NODE_PATTERN})?|{HOST_PATTERN}/{PATH_PATTERN}:snap-[0-9a-f]{{32}})$"
)
GROUP_ID_RE = re.compile(r"^group-[0-9a-f]{32}$")
LAYER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")

AccessMode = csi.VolumeCapability.AccessMode
SUPPORTED_MODES = {
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.MULTI_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
    AccessMode.SINGLE_NODE_MULTI_WRITER,
}
READONLY_MODES = {AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY}
# Generic VFS flags that make sense on an overlay or a bind mount.
ALLOWED_MOUNT_FLAGS = {
    "ro",
    "rw",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "lazytime",
    "nosuid",
    "nodev",
    "noexec",
    "sync",
    "dirsync",
}
# kubelet's seLinuxMount option (pkg/volume/util/selinux.go AddSELinuxMountOption):
# context="user:role:type[:level]", double-quoted so the level's commas stay in it.
SELINUX_CONTEXT_PREFIX = "context="
MAX_SELINUX_CONTEXT = 256
_SELINUX_CONTEXT_RE = re.compile(r'^context="[\w.-]+:[\w.-]+:[\w.-]+(?::[\w.,:-]+)?"$', re.ASCII)
PARAM_PREFIX = "csi.storage.k8s.io/"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
EPHEMERAL_ATTRIBUTES = {"size", "baseLayer"}
_QUANTITY_RE = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$")
_QUANTITY_UNITS = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
}
VOLUME_PARAMETERS = {"baseLayer"}
LEGACY_FS_TYPE = "fstype"  # compared lowercased, as prepareProvision does


def required(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


def name(value: str, what: str = "name") -> str:
    required(value, what)
    if len(value.encode()) > MAX_NAME or "\x00" in value:
        raise InvalidArgument(f"{what} must be at most {MAX_NAME} bytes without NUL")
    return value


def known_id(value: str, pattern: re.Pattern[str], what: str) -> bool:
    """Validate presence; return whether it has the shape of an id we issue."""
    required(value, what)
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is too long")
    return bool(pattern.match(value))


def path(value: str, what: str) -> str:
    """An absolute, normalised host path with no '..' and no symlink at its end,
    its parent resolved: the kernel records a mount at the resolved path, so the
    driver records and compares that one too (a symlinked parent would otherwise
    leave a mount no recorded path names)."""
    required(value, what)
    if len(value) > MAX_PATH or "\x00" in value:
        raise InvalidArgument(f"{what} is too long or contains NUL")
    control = next((ch for ch in value if ch < " " or ch == "\x7f"), None)
    if control is not None:
        # kubelet never makes such paths, and a mount at one (a carriage return) breaks
        # the line structure of /proc/self/mountinfo as the engine reads it
        raise InvalidArgument(f"{what} must not contain {control!r}")
    if not os.path.isabs(value):
        raise InvalidArgument(f"{what} must be absolute")
    if ".." in value.split("/"):
        raise InvalidArgument(f"{what} must not contain '..'")
    if any(len(part.encode()) > 255 for part in value.split("/")):
        raise InvalidArgument(f"{what} has a component longer than 255 bytes")
    norm = os.path.normpath(value)
    if os.path.islink(norm):
        raise InvalidArgument(f"{what} must not be a symlink")
    parent, name = os.path.split(norm)
    resolved = os.path.join(os.path.realpath(parent), name)
    if len(resolved) > MAX_PATH:
        raise InvalidArgument(f"{what} is too long or contains NUL")
    return resolved


def outside_state(path: str, state_dir: str | os.PathLike, what: str) -> str:
    """Refuse a node path in or above the driver's state dir: a mount there would hide
    or corrupt the layers, and NodeUnpublish would remove the driver's directories."""
    real, base = os.path.realpath(path), os.path.realpath(state_dir)
    if real == base or real.startswith(base + "/") or base.startswith(real.rstrip("/") + "/"):
        raise InvalidArgument(f"{what} must not be in or above the driver's state dir")
    return path


def inside(path: str, root: str, what: str) -> str:
    """With ``--kubelet-dir``, node paths must resolve (symlinks followed) under it,
    so a symlinked parent cannot lead a mount or a delete elsewhere on the host."""
    if root:
        real, base = os.path.realpath(path), os.path.realpath(root)
        if real != base and not real.startswith(base.rstrip("/") + "/"):
            raise InvalidArgument(f"{what} must be under the kubelet dir {root}")
    return path


# kubelet's own paths (pkg/volume/csi): what a node path must look like, relative to
# --kubelet-dir, when it is set. {seg} is one path component (a PV name, a pod UID, a
# volume's spec name); kubelet makes the parents, the driver the last component.
_SEG = r"[^/]+"
_CSI = r"plugins/kubernetes\.io/csi"
KUBELET_SHAPES = {
    # csi_attacher.go makeDeviceMountPath: <driver>/<sha256 of the volume handle>/globalmount
    "staging": r"{csi}/{driver}/[0-9a-f]{{64}}/globalmount",
    # csi_block.go getStagingPath
    "block-staging": r"{csi}/volumeDevices/staging/{seg}",
    # csi_mounter.go GetPath
    "target": r"pods/{seg}/volumes/kubernetes\.io~csi/{seg}/mount",
    # csi_block.go getPublishPath
    "block-target": r"{csi}/volumeDevices/publish/{seg}/{seg}",
    # csi_block.go GetGlobalMapPath + "/" + pod UID (csi_plugin.go NewBlockVolumeMapper's stats path)
    "block-map": r"{csi}/volumeDevices/{seg}/dev/{seg}",
}
STAGING_SHAPES = ("staging", "block-staging")
TARGET_SHAPES = ("target", "block-target")
STATS_SHAPES = (*TARGET_SHAPES, *STAGING_SHAPES, "block-map")
_SHAPE_HELP = {
    "staging": "<kubelet dir>/plugins/kubernetes.io/csi/<driver>/<sha256>/globalmount",
    "block-staging": "<kubelet dir>/plugins/kubernetes.io/csi/volumeDevices/staging/<pv>",
    "target": "<kubelet dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<name>/mount",
    "block-target": "<kubelet dir>/plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<pod uid>",
    "block-map": "<kubelet dir>/plugins/kubernetes.io/csi/volumeDevices/<pv>/dev/<pod uid>",
}


def kubelet_shape(path: str, root: str, driver: str, shapes: tuple[str, ...], what: str) -> str:
    """With ``--kubelet-dir``, which of ``shapes`` (kubelet's own paths) ``path`` has,
    resolved (symlinks followed) against the resolved kubelet dir; anything else, the
    kubelet dir itself included, is INVALID_ARGUMENT. '' without ``--kubelet-dir``."""
    if not root:
        return ""
    real, base = os.path.realpath(path), os.path.realpath(root).rstrip("/")
    rel = real[len(base) + 1 :] if real.startswith(base + "/") else None
    if rel is not None:
        for shape in shapes:
            pattern = KUBELET_SHAPES[shape].format(csi=_CSI, driver=re.escape(driver), seg=_SEG)
            if re.fullmatch(pattern, rel) and all(p not in (".", "..") for p in rel.split("/")):
                return shape
    raise InvalidArgument(
        f"{what} {path[:200]} is not a path kubelet makes under the kubelet dir {root}; expected "
        + " or ".join(_SHAPE_HELP[s] for s in shapes)
    )


def shape_of(path: str, driver: str, shapes: tuple[str, ...]) -> str:
    """Which of ``shapes`` ``path`` ends with, under any root ('' if none): without
    ``--kubelet-dir``, what an unknown volume's teardown may remove is still only what
    the driver makes at a path kubelet would name."""
    for shape in shapes:
        pattern = KUBELET_SHAPES[shape].format(csi=_CSI, driver=re.escape(driver), seg=_SEG)
        if re.fullmatch(rf"(?:/[^/]+)*/{pattern}", path):
            return shape
    return ""


def string_map(m: dict[str, str], what: str) -> dict[str, str]:
    if len(m) > MAX_MAP_ENTRIES:
        raise InvalidArgument(f"{what} has more than {MAX_MAP_ENTRIES} entries")
    for k, v in m.items():
        if len(k) > MAX_NAME or len(v) > MAX_VALUE:
            raise InvalidArgument(f"{what} key or value too long")
    return dict(m)


def quantity(text: str, what: str) -> int:
    """A Kubernetes-style size: '1Gi', '500M', '1048576'."""
    m = _QUANTITY_RE.match(text.strip())
    if not m:
        raise InvalidArgument(f"{what} {text[:40]!r} is not a size such as 1Gi or 500Mi")
    return int(m.group(1)) * _QUANTITY_UNITS[m.group(2)]


def ephemeral_attributes(context: dict[str, str]) -> dict:
    """The volumeAttributes of an inline volume: size and baseLayer."""
    string_map(context, "volume_context")
    unknown = sorted(k for k in context if k not in EPHEMERAL_ATTRIBUTES and not k.startswith(PARAM_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown volumeAttributes {unknown}; supported: {sorted(EPHEMERAL_ATTRIBUTES)}"
        )
    base = context.get("baseLayer", "")
    if base and not LAYER_NAME_RE.match(base):
        raise InvalidArgument("baseLayer must be a layer name ([a-zA-Z0-9._-], at most 63)")
    return {"size": quantity(context["size"], "size") if "size" in context else 0, "baseLayer": base}


def fs_type_parameter(params: dict[str, str], offered: Capabilities) -> str:
    """The legacy StorageClass key ``fsType`` (any case; '' when absent): external-provisioner
    (prepareProvision) keeps it in the parameters besides the capability's fs_type, and its
    capacity controller (syncCapacity) sends it with no capability at all. It must be one
    the node's layer backend ``offered``."""
    values = {v for k, v in params.items() if k.lower() == LEGACY_FS_TYPE}
    if len(values) > 1:
        raise InvalidArgument(f"parameters name more than one fsType: {sorted(values)}")
    fs_type = values.pop() if values else ""
    if fs_type and fs_type not in offered.fs_types:
        raise InvalidArgument(
            f"parameter fsType {fs_type[:40]!r} is not supported; use one of {sorted(offered.fs_types)}"
        )
    return fs_type


def volume_parameters(
    params: dict[str, str], offered: Capabilities, caps: list[Capability] | None = None
) -> dict[str, str]:
    """A StorageClass's parameters; a legacy fsType must be one the backend ``offered`` and
    agree with each mount capability."""
    params = string_map(params, "parameters")
    unknown = sorted(
        k
        for k in params
        if k not in VOLUME_PARAMETERS and k.lower() != LEGACY_FS_TYPE and not k.startswith(PARAM_PREFIX)
    )
    if unknown:
        raise InvalidArgument(
            f"unknown parameters {unknown}; supported: {sorted(VOLUME_PARAMETERS | {'fsType'})}"
        )
    fs_type = fs_type_parameter(params, offered)
    clash = next((c.fs_type for c in caps or [] if fs_type and c.fs_type and c.fs_type != fs_type), "")
    if clash:  # (a block capability has no fs_type: one StorageClass serves both kinds)
        raise InvalidArgument(
            f"parameter fsType {fs_type!r} conflicts with the capability's fs_type {clash!r}"
        )
    base = params.get("baseLayer", "")
    if base and looks_like_reference(base):
        try:
            Reference.parse(base)
        except BadReference as e:
            raise InvalidArgument(f"baseLayer: {e}") from e
    elif base and not LAYER_NAME_RE.match(base):
        raise InvalidArgument(
            "baseLayer must be a layer name ([a-zA-Z0-9._-], at most 63) or an image reference "
            "(HOST/PATH:TAG or HOST/PATH@sha256:...)"
        )
    return params


SNAPSHOT_PARAMETERS = {"repository", "liveCopyLimit", "compression"}


@dataclass(frozen=True)
class SnapshotParameters:
    repository: Repository | None  # export the snapshot there
    live_copy_limit: int | None  # the most a snapshot of a volume in use may copy (lowers the node's)
    compression: str = codec.NONE  # how its exported layers travel


def snapshot_parameters(params: dict[str, str]) -> SnapshotParameters:
    """A VolumeSnapshotClass's parameters: ``repository`` exports the snapshot there;
    ``liveCopyLimit`` (a size) lowers the node's --max-live-snapshot-copy; ``compression``
    (none, gzip, zstd) is how an exported snapshot's new layers travel."""
    params = string_map(params, "parameters")
    unknown = sorted(k for k in params if k not in SNAPSHOT_PARAMETERS and not k.startswith(PARAM_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown snapshot parameters {unknown}; supported: {sorted(SNAPSHOT_PARAMETERS)}"
        )
    limit = quantity(params["liveCopyLimit"], "liveCopyLimit") if "liveCopyLimit" in params else None
    compression = params.get("compression", codec.NONE)
    if compression not in codec.COMPRESSIONS:
        raise InvalidArgument(
            f"compression {compression[:40]!r} is not one of {', '.join(codec.COMPRESSIONS)}"
        )
    if "repository" not in params:
        return SnapshotParameters(None, limit, compression)
    try:
        return SnapshotParameters(Repository.parse(params["repository"]), limit, compression)
    except BadReference as e:
        raise InvalidArgument(f"repository: {e}") from e


@dataclass(frozen=True)
class Capability:
    access_type: str
    fs_type: str
    mount_flags: tuple[str, ...]
    mode: int
    volume_mount_group: str


def is_selinux_context(flag: str) -> bool:
    return flag.startswith(SELINUX_CONTEXT_PREFIX)


def mount_flags(flags: tuple[str, ...]) -> tuple[str, ...]:
    """Generic VFS flags, and at most one well-formed SELinux ``context="..."``: its
    shape is checked strictly, as it reaches the mount options of the stage mount."""
    bad = [f for f in flags if f not in ALLOWED_MOUNT_FLAGS and not is_selinux_context(f)]
    if bad:
        raise InvalidArgument(
            f"mount flags {[f[:80] for f in bad[:8]]} are not supported; allowed: "
            f'{sorted(ALLOWED_MOUNT_FLAGS)} and context="<SELinux label>"'
        )
    contexts = [f for f in flags if is_selinux_context(f)]
    for f in contexts:
        if len(f) > MAX_SELINUX_CONTEXT or not _SELINUX_CONTEXT_RE.fullmatch(f):
            raise InvalidArgument(
                f'mount flag {f[:80]!r} is not context="user:role:type[:level]" '
                f"(double-quoted, SELinux label characters, at most {MAX_SELINUX_CONTEXT} bytes)"
            )
    if len(contexts) > 1:
        raise InvalidArgument("at most one context= mount flag")
    return flags


def capability(cap: csi.VolumeCapability, offered: Capabilities) -> Capability:
    """Parse one capability, refusing what this driver, and the node's layer backend
    (what it ``offered``), cannot do."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument("volume_capability needs an access_type (mount or block)")
    mode = cap.access_mode.mode
    if mode not in SUPPORTED_MODES:
        label = AccessMode.Mode.Name(mode) if mode in AccessMode.Mode.values() else str(mode)
        raise InvalidArgument(f"access mode {label} is not supported by a node-local driver")
    if kind == "block" and not offered.block:
        raise InvalidArgument(
            "block volumes are not supported: this node's layer backend keeps no raw block volumes"
        )
    if kind == "block":
        return Capability("block", "", (), mode, "")
    fs_type = cap.mount.fs_type
    if fs_type and fs_type not in offered.fs_types:
        raise InvalidArgument(
            f"fs_type {fs_type[:40]!r} is not supported; use one of {sorted(offered.fs_types)}"
        )
    flags = mount_flags(tuple(cap.mount.mount_flags))
    return Capability(kind, fs_type, flags, mode, cap.mount.volume_mount_group)


def capabilities(caps: list[csi.VolumeCapability], offered: Capabilities) -> list[Capability]:
    if not caps:
        raise InvalidArgument("volume_capabilities are required")
    parsed = [capability(c, offered) for c in caps]
    if len({c.access_type for c in parsed}) > 1:
        raise InvalidArgument("a volume is either mount or block, not both")
    return parsed
