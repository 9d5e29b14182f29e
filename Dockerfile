# syntax=docker/dockerfile:1
# tractoscale: BIDS App for diffusion MRI (CPU, or CUDA with the host's NVIDIA driver).
#
#   make image          # docker (BuildKit) or podman (buildah), whichever is installed
#   docker build --build-arg VERSION=0.1.0 -t tractoscale/tractoscale:0.1.0 .
#
# Needs BuildKit (Docker >= 23 uses it by default) or buildah (podman) for the source bind mount below.
# Every step after the base image is docker/install.sh; CI runs that same script
# (tests/test_container.py), so a broken install step fails the test suite. It installs the versions
# pinned in docker/constraints.txt, the ones CI tests.
#
# Build arguments:
#   BASE_IMAGE    the base (default below). On a machine that cannot pull it, any local Debian or
#                 Ubuntu image with apt-get stands in: docker/local_base.sh builds one with
#                 debootstrap, then `make image BASE_IMAGE=localhost/tractoscale-base:trixie`.
#   TEMPLATEFLOW  fetch (default) or skip: the TemplateFlow files come from TemplateFlow's servers;
#                 without them only --tbss-target/--tbss-space TEMPLATE fail (with a clear error).
#   VERSION, VCS_REF  labels; VERSION must be the package's version (install.sh checks it).
#
# Base: the CUDA 12 "base" flavour (CUDA runtime library only). numba-cuda[cu12] installs NVVM,
# NVRTC and nvJitLink as wheels, so the bigger "runtime" flavour's libraries (cuBLAS, cuFFT, NPP...)
# would go unused. Ubuntu 24.04 provides Python 3.12 (tools/lock_image.py resolves for it).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Keep this default equal to `version` in pyproject.toml (tests/test_container.py checks it);
# install.sh fails the build if the installed package reports another version.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG TEMPLATEFLOW=fetch

LABEL org.opencontainers.image.title="tractoscale" \
      org.opencontainers.image.description="BIDS App for diffusion MRI: model maps, GPU/CPU tractography, TBSS-style group statistics and bundle segmentation" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/tractoscale/tractoscale" \
      org.opencontainers.image.licenses="BSD-3-Clause"

# Everything the app writes at run time goes under /tmp, so the image works with a read-only root
# filesystem (docker run --read-only --tmpfs /tmp) and under `apptainer run --cleanenv`, which replaces
# HOME with the host's: no setting below depends on HOME.
# Kernels are linked to machine code by the nvJitLink wheel, so any CUDA 12 driver will do; the base
# image's own requirement (the CUDA version of its runtime library, unused here) is relaxed to match.
ENV PATH=/opt/tractoscale/bin:${PATH} \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NUMBA_CACHE_DIR=/tmp/numba_cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    DENO_DIR=/tmp/deno \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_REQUIRE_CUDA="cuda>=12.0" \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRACTOSCALE_CONTAINER_TYPE=docker \
    TRACTOSCALE_CONTAINER_TAG=tractoscale/tractoscale:${VERSION}

# The source is bind-mounted (read-write, changes discarded), not copied: no source layer in the image.
RUN --mount=type=bind,source=.,target=/src,rw \
    bash /src/docker/install.sh --src /src --prefix /opt/tractoscale \
        --constraints /src/docker/constraints.txt \
        --templateflow-home /opt/templateflow --templates "${TEMPLATEFLOW}" \
        --expect-version "${VERSION}" --user tractoscale --uid 10001 --link /usr/local/bin

# Portable Numba cache of the CPU kernels (Numba's "generic" CPU: runs on any x86-64 host), so a new
# container reaches tracking without compiling them (40 s measured without it): at start the app copies it into
# NUMBA_CACHE_DIR (kernels/warmup.py, bids_app/resources.py). The app looks for it at this path.
RUN /opt/tractoscale/bin/python -m kernels.warmup --portable /opt/tractoscale/share/tractoscale/numba-cache \
    && chmod -R a+rX /opt/tractoscale/share/tractoscale

USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["tractoscale"]
