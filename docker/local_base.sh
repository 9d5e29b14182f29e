#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image, for machines that cannot pull it from its
# registry but reach a Debian mirror: a minimal Debian made with debootstrap, imported into docker
# or podman. The Dockerfile needs only apt-get from its base (docker/install.sh installs Python);
# the CUDA base adds the CUDA runtime library, which the image does not use (the CUDA wheels
# bring their own), and the NVIDIA container settings.
#
#   sudo docker/local_base.sh                       # localhost/tractoscale-base:trixie
#   make image BASE_IMAGE=localhost/tractoscale-base:trixie
#
# Debian 13 (trixie) has Python 3.13, a newer Python than the CUDA base's 3.12: the pinned
# versions (docker/constraints.txt) install on both.
set -euo pipefail

SUITE=trixie
MIRROR=http://deb.debian.org/debian
TAG=""
ENGINE=""

usage() {
    cat <<'EOF'
Usage: docker/local_base.sh [--suite NAME] [--mirror URL] [--tag NAME] [--engine docker|podman]

  --suite NAME    Debian release to bootstrap (default: trixie)
  --mirror URL    Debian mirror (default: http://deb.debian.org/debian)
  --tag NAME      image name (default: localhost/tractoscale-base:SUITE)
  --engine E      docker or podman (default: docker if its daemon answers, else podman)
Needs root and debootstrap.
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
        --suite) SUITE="$2"; shift 2 ;;
        --mirror) MIRROR="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --engine) ENGINE="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "local_base.sh: unknown option '$1'" >&2; usage >&2; exit 64 ;;
    esac
done
TAG="${TAG:-localhost/tractoscale-base:$SUITE}"
die() { echo "local_base.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "needs debootstrap (apt-get install debootstrap)"
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else die "needs docker (with its daemon running) or podman"; fi
fi

ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/tractoscale-base.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
echo "local_base.sh: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "local_base.sh: $TAG"
"$ENGINE" image ls "$TAG"
