"""A new file-system mount made detached, by the new mount API: fsopen(2), fsconfig(2)
with the options read once (``host.mountopts``), fsmount(2). Nothing is attached to
any path here: the caller moves the mount where it decides (``host.beneath``: onto
the fd of a node path it checked). A refusal carries what the kernel logged on the
file-system context ("overlay: failed to resolve 'l/x': -2"), which mount(2) would
have left in dmesg only."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from collections.abc import Iterable

from csi_driver.host import mountopts
from csi_driver.host.libc import syscall

log = logging.getLogger(__name__)

# syscall numbers: the same on x86_64 and aarch64 (the unified table from 424 on)
_FSOPEN, _FSCONFIG, _FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6


#: fsconfig(2) copies a string value of at most this many bytes (strndup_user(value, 256))
MAX_STRING = 255


def lower_layers(lowerdir: str) -> list[str]:
    """An overlay's ``lowerdir`` list (``a:b``, ``\\:`` escaping a colon), one path each,
    for ``lowerdir+`` (Linux 6.8), which takes one unescaped path per call."""
    if "::" in lowerdir:
        raise MountRefused(errno.EINVAL, "overlay data-only layers (::) are not supported here")
    layers = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", lowerdir)]
    if any(not p for p in layers):
        raise MountRefused(errno.EINVAL, f"overlay lowerdir {lowerdir[:80]!r} has an empty layer")
    return layers


class MountRefused(OSError):
    """The kernel refused a new mount: its errno, the step, and what it logged."""


def new_mount(fstype: str, source: str, options: Iterable[str]) -> int:
    """A detached mount of a new ``fstype`` file system (or one whose superblock the
    kernel shares, as for a block device mounted already), as an fd (O_CLOEXEC).
    Relative paths in ``options`` (an overlay's layers) resolve against the calling
    thread's working directory."""
    opts = mountopts.parse(options)
    fsfd = _call(f"fsopen {fstype}", None, _FSOPEN, os.fsencode(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))
    try:
        _config(fsfd, FSCONFIG_SET_STRING, "source", source)
        for flag in opts.sb_flags:
            _config(fsfd, FSCONFIG_SET_FLAG, flag, None)
        for key, value in opts.fs_params():
            if fstype == "overlay" and key == "lowerdir" and value and len(value.encode()) > MAX_STRING:
                for layer in lower_layers(value):  # one at a time: a string stops at 256 bytes
                    _config(fsfd, FSCONFIG_SET_STRING, "lowerdir+", layer)
                continue
            _config(fsfd, FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING, key, value)
        _config(fsfd, FSCONFIG_CMD_CREATE, None, None)
        mnt = _call(
            f"fsmount {fstype}",
            fsfd,
            _FSMOUNT,
            ctypes.c_int(fsfd),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(opts.attr_set),
        )
        for line in kernel_log(fsfd):
            log.debug("mount %s %s: %s", fstype, source, line)
        return mnt
    finally:
        os.close(fsfd)


def _config(fsfd: int, cmd: int, key: str | None, value: str | None) -> None:
    step = "fsconfig " + ("create" if key is None else key if value is None else f"{key}={value}")
    _call(
        step,
        fsfd,
        _FSCONFIG,
        ctypes.c_int(fsfd),
        ctypes.c_uint(cmd),
        None if key is None else os.fsencode(key),
        None if value is None else os.fsencode(value),
        ctypes.c_int(0),
    )


def _call(step: str, fsfd: int | None, number: int, *args) -> int:
    try:
        return syscall(number, *args)
    except OSError as e:
        said = kernel_log(fsfd) if fsfd is not None else []
        detail = f"{step}: {e.strerror}" + (f" ({'; '.join(said)})" if said else "")
        raise MountRefused(e.errno, detail) from None


def kernel_log(fsfd: int) -> list[str]:
    """The messages the kernel logged on a file-system context so far ("e overlay:
    ..." for an error, "w" a warning, "i" information), each read once."""
    lines: list[str] = []
    for _ in range(64):  # the context keeps at most 8; read(2) says ENODATA past the last
        try:
            msg = os.read(fsfd, 4096)
        except OSError as e:
            if e.errno != errno.ENODATA:
                log.debug("reading the mount context's log: %s", e)
            break
        lines.append(msg.decode(errors="replace").rstrip("\n"))
    return lines
