"""Build the driver's image from the Dockerfile with podman, on a Python base made
from Debian's archive (no container registry is reachable from CI).

The base is debootstrap's bookworm minbase with Debian's python3 and a venv on
PATH (the Dockerfile calls ``pip`` and expects console scripts on PATH, as on the
python:*-slim images it defaults to). It is cached as a tarball between runs;
every image this module creates is removed again by ``remove_new_images``.
Nothing of this machine goes into an image: the machine's CA bundle (pip needs it
to reach the package index from here) is bind-mounted over the base's own
/etc/ssl/certs in the build's RUN steps only; the CI base names that path in
PIP_CERT (without it, pip would use its vendored bundle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
PACKAGES = "python3,python3-venv,python3-pip"
CACHE = Path(os.environ.get("OVERLAY_CSI_IMAGE_CACHE", "/var/cache/overlay-csi-ci"))
BASE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def missing_tools() -> str:
    if os.geteuid() != 0:
        return "needs root (podman build with chroot isolation, debootstrap)"
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash scripts/setup.sh --test installs it)"
    return ""


def podman(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def image_ids() -> set[str]:
    return set(podman("images", "--all", "--quiet", "--no-trunc").split())


def remove_new_images(before: set[str]) -> None:
    """Remove every image created since ``before`` (the built image, its stages, the base)."""
    for _ in range(3):  # children before parents
        new = image_ids() - before
        if not new:
            return
        subprocess.run(["podman", "rmi", "--force", *new], capture_output=True, text=True)


def _base_key() -> str:
    return hashlib.sha256(f"{SUITE}|{PACKAGES}|{BASE_PATH}|v1".encode()).hexdigest()[:12]


def base_tarball() -> tuple[Path, float]:
    """The cached base root file system (made with debootstrap when missing), and the
    seconds spent making it now (0 when cached)."""
    tarball = CACHE / f"python-base-{SUITE}-{_base_key()}.tar"
    if tarball.exists():
        return tarball, 0.0
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        root = Path(work) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root),
                        "http://deb.debian.org/debian"], check=True, capture_output=True, timeout=900)
        subprocess.run(["chroot", str(root), "python3", "-m", "venv", "/opt/venv"], check=True,
                       capture_output=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        os.rename(partial, tarball)  # a crash leaves no half-made cache entry
    return tarball, time.monotonic() - start


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    base: str
    size_bytes: int
    base_seconds: float
    build_seconds: float


def build(tag: str = "localhost/overlay-csi:ci") -> BuiltImage:
    tarball, base_seconds = base_tarball()
    base = f"localhost/overlay-csi-ci-base:{SUITE}-{_base_key()}"
    podman("import", "--change", f"ENV PATH={BASE_PATH}", "--change", "ENV LANG=C.UTF-8",
           "--change", f"ENV PIP_CERT={CA_BUNDLE}", str(tarball), base)
    start = time.monotonic()
    podman("build", "--isolation", "chroot", "--network", "host", "--layers=false",
           "--build-arg", f"PYTHON_IMAGE={base}", "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",
           "-t", tag, str(REPO), timeout=900)
    build_seconds = time.monotonic() - start
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag))
    return BuiltImage(tag, base, size, base_seconds, build_seconds)


def _config(ref: str) -> dict:
    return json.loads(podman("image", "inspect", "--format", "{{json .Config}}", ref))


def entrypoint(ref: str) -> list[str]:
    return list(_config(ref).get("Entrypoint") or [])


def environment(ref: str) -> dict[str, str]:
    """The image's own environment (PATH, ...), which a runtime starts from."""
    return dict(item.split("=", 1) for item in _config(ref).get("Env") or [])


def mount_rootfs(ref: str) -> Path:
    return Path(podman("image", "mount", ref))


def unmount_rootfs(ref: str) -> None:
    subprocess.run(["podman", "image", "unmount", ref], capture_output=True)
