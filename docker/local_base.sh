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
# Behind a proxy that intercepts TLS with its own certificate authority, pip in the build trusts
# only the certificates of the base: --ca-bundle /etc/ssl/certs/ca-certificates.crt adds the host's.
#
# Debian 13 (trixie) has Python 3.13, a newer Python than the CUDA base's 3.12: the pinned
# versions (docker/constraints.txt) install on both.
set -euo pipefail

SUITE=trixie
MIRROR=http://deb.debian.org/debian
TAG=""
ENGINE=""
CA_BUNDLE=""

usage() {
    cat <<'EOF'
Usage: docker/local_base.sh [--suite NAME] [--mirror URL] [--tag NAME] [--engine docker|podman]
                            [--ca-bundle FILE]

  --suite NAME    Debian release to bootstrap (default: trixie)
  --mirror URL    Debian mirror (default: http://deb.debian.org/debian)
  --tag NAME      image name (default: localhost/tractoscale-base:SUITE)
  --engine E      docker or podman (default: docker if its daemon answers, else podman)
  --ca-bundle F   also trust the certificates in F (PEM), e.g. a TLS-intercepting proxy's
Needs root and debootstrap.
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
        --suite) SUITE="$2"; shift 2 ;;
        --mirror) MIRROR="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --engine) ENGINE="$2"; shift 2 ;;
        --ca-bundle) CA_BUNDLE="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "local_base.sh: unknown option '$1'" >&2; usage >&2; exit 64 ;;
    esac
done
TAG="${TAG:-localhost/tractoscale-base:$SUITE}"
die() { echo "local_base.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "needs debootstrap (apt-get install debootstrap)"
[ -z "$CA_BUNDLE" ] || [ -f "$CA_BUNDLE" ] || die "no such file: $CA_BUNDLE"
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else die "needs docker (with its daemon running) or podman"; fi
fi

ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/tractoscale-base.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
echo "local_base.sh: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
if [ -n "$CA_BUNDLE" ]; then
    cp "$CA_BUNDLE" "$ROOTFS/usr/local/share/ca-certificates/local-base-extra.crt"
    chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the base"
fi
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "local_base.sh: $TAG"
"$ENGINE" image ls "$TAG"
