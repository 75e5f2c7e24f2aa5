# syntax=docker/dockerfile:1
#
# overlay-csi image: one image for every role (node plugin, controller-expand
# companion of the resizer, CLI).
#
#   docker build -t overlay-csi:dev .
#
# Stage 1 builds wheels for the package and all its dependencies; stage 2
# installs them with no network access to an index and adds the host tools
# the node plugin runs. Nothing the driver does not run stays: no wheels, no apt
# caches, no pip or setuptools (the installer is removed after installing).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README/LICENSE are optional: the glob lets the build work with or without them.
COPY pyproject.toml README* LICENSE* ./
COPY csi_driver/ ./csi_driver/
COPY proto/ ./proto/
# The metrics extra (prometheus-client) serves --metrics-address.
RUN pip wheel --wheel-dir /wheels ".[metrics]"


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="overlay-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver for node-local, copy-on-write overlay volumes" \
      org.opencontainers.image.licenses="Apache-2.0"

# Host tools the node plugin calls:
#   mount, umount, losetup          -> mount
#   fsfreeze, blockdev, findmnt     -> util-linux
#   mkfs.ext4, resize2fs, e2fsck    -> e2fsprogs
#   mkfs.xfs, xfs_growfs            -> xfsprogs
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        mount \
        util-linux \
        e2fsprogs \
        xfsprogs \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# The kubernetes client's asyncio half (kubernetes/aio, about half its size) is
# never imported: the driver uses the synchronous client only. zstandard ships two
# backends of 12 MB each; its C extension is the one it loads (checked below), so
# the cffi one goes.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "overlay-csi[metrics]" \
    && python -c "__import__('shutil').rmtree(__import__('kubernetes.aio', fromlist=['_']).__path__[0])" \
    && python -c "[p.unlink() for d in [__import__('pathlib').Path(__import__('zstandard').__file__).parent] for p in [*d.glob('_cffi*.so'), d / 'backend_cffi.py']]" \
    && python -c "assert __import__('zstandard').backend == 'cext'" \
    && python -m pip uninstall --yes --quiet pip setuptools \
    && overlay-csi --help >/dev/null \
    && python -c 'import csi_driver.kube.api, csi_driver.registry.codec, kubernetes.client'

# The node plugin needs root (mounts, loop devices); the chart runs it
# privileged. The controller-expand companion runs unprivileged.
ENTRYPOINT ["overlay-csi"]
CMD ["--help"]
