#!/usr/bin/env bash
# Install tractoscale into a virtual environment: every step the Dockerfile runs after its base image.
#
# CI runs this same script on a plain Debian machine (Python 3.11, PyPI reachable, no other network,
# no Docker engine), so a broken install step fails the test suite even though no image is built there:
#   docker/install.sh --prefix /tmp/ts --skip-templates --no-user
#
# Steps:
#   1. find Python >= 3.11; only if there is none, install it with apt-get (needs root)
#   2. create a venv at --prefix and `pip install SRC[EXTRAS]` (default extras: cuda,dask), every
#      package pinned by docker/constraints.txt (tools/lock_image.py writes it; CI installs the same)
#   3. fetch the TemplateFlow files the app uses into --templateflow-home, retrying (skip with
#      --templates skip: CI cannot reach TemplateFlow's S3 servers)
#      and the reports' 3D viewer (niivue's browser build, `tractoscale install-viewer`: npm from the
#      npm registry; skip with --skip-viewer). Without npm, as root, Node.js/npm are installed with
#      apt-get for this step and removed after it.
#   4. checks and safe warm-up: `tractoscale --version` (and --expect-version), the full argument parser,
#      and, with the cuda extra, NVVM compiling a small kernel to PTX (no GPU or driver needed)
#   5. create the non-root user the image runs as (skip with --no-user)
#
# Numba's on-disk cache is NOT pre-filled: its entries are keyed on the CPU model of the machine that
# compiled them (a cluster node rarely matches the build machine) and NUMBA_CACHE_DIR points at a fresh
# tmpfs (/tmp) at run time anyway. Kernels compile on first use in each run.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: docker/install.sh [options]

  --prefix DIR             virtual environment to create (default: /opt/tractoscale)
  --src DIR                tractoscale source tree (default: the folder above this script)
  --extras LIST            pip extras, comma separated, '' for none (default: cuda,dask)
  --constraints FILE       pip constraints pinning every package (default: SRC/docker/constraints.txt;
                           '' installs the newest releases instead)
  --python EXE             Python >= 3.11 to build the venv from (default: the first of python3.13,
                           python3.12, python3.11, python3 that is new enough and has venv)
  --templateflow-home DIR  where TemplateFlow files go (default: $TEMPLATEFLOW_HOME or /opt/templateflow)
  --templates fetch|skip   fetch the TemplateFlow files from TemplateFlow's servers (default), or not
  --skip-templates         the same as --templates skip
  --templates-tries N      attempts before giving up on TemplateFlow's servers (default: 3)
  --skip-viewer            do not install the reports' 3D viewer (niivue, from the npm registry)
  --expect-version V       fail unless the installed tractoscale reports version V
  --link DIR               also link the tractoscale command into DIR (the image: /usr/local/bin, on
                           the PATH that login shells set, e.g. the jobs bosh runs under Apptainer)
  --user NAME              non-root user to create (default: tractoscale)
  --uid N                  its uid and gid (default: 10001)
  --no-user                do not create a user (CI, or installs without root)
  --no-system-packages     never call apt-get, even if no suitable Python is found
  -h, --help               this help
EOF
}

PREFIX=/opt/tractoscale
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS=cuda,dask
PYTHON=""
TF_HOME="${TEMPLATEFLOW_HOME:-/opt/templateflow}"
CONSTRAINTS=default
SKIP_TEMPLATES=0
SKIP_VIEWER=0
TEMPLATE_TRIES=3
EXPECT_VERSION=""
USER_NAME=tractoscale
USER_ID=10001
MAKE_USER=1
LINK_DIR=""
SYSTEM_PACKAGES=1

value() {  # the value after an option, or a usage error
    [ $# -ge 2 ] || { echo "install.sh: $1 needs a value" >&2; exit 64; }
    printf '%s' "$2"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="$(value "$@")"; shift 2 ;;
        --src) SRC="$(value "$@")"; shift 2 ;;
        --extras) EXTRAS="$(value "$@")"; shift 2 ;;
        --constraints) CONSTRAINTS="$(value "$@")"; shift 2 ;;
        --templates)
            case "$(value "$@")" in
                fetch) SKIP_TEMPLATES=0 ;;
                skip) SKIP_TEMPLATES=1 ;;
                *) echo "install.sh: --templates takes fetch or skip, not '$2'" >&2; exit 64 ;;
            esac
            shift 2 ;;
        --templates-tries) TEMPLATE_TRIES="$(value "$@")"; shift 2 ;;
        --python) PYTHON="$(value "$@")"; shift 2 ;;
        --templateflow-home) TF_HOME="$(value "$@")"; shift 2 ;;
        --expect-version) EXPECT_VERSION="$(value "$@")"; shift 2 ;;
        --link) LINK_DIR="$(value "$@")"; shift 2 ;;
        --user) USER_NAME="$(value "$@")"; shift 2 ;;
        --uid) USER_ID="$(value "$@")"; shift 2 ;;
        --skip-templates) SKIP_TEMPLATES=1; shift ;;
        --skip-viewer) SKIP_VIEWER=1; shift ;;
        --no-user) MAKE_USER=0; shift ;;
        --no-system-packages) SYSTEM_PACKAGES=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1'" >&2; usage >&2; exit 64 ;;
    esac
done

say() { printf '[install.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

[ -f "$SRC/pyproject.toml" ] || die "no pyproject.toml in --src $SRC"
[ "$CONSTRAINTS" = default ] && CONSTRAINTS="$SRC/docker/constraints.txt"
[ -z "$CONSTRAINTS" ] || [ -f "$CONSTRAINTS" ] || die "no constraints file $CONSTRAINTS"
[[ "$TEMPLATE_TRIES" =~ ^[1-9][0-9]*$ ]] || { echo "install.sh: --templates-tries takes a positive integer" >&2; exit 64; }
if [ "$MAKE_USER" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "creating the user needs root (use --no-user)"
fi

# --------------------------------------------------------------------------- 1. Python >= 3.11
good_python() {  # a Python >= 3.11 that can create venvs with pip
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

find_python() {
    local c
    for c in python3.13 python3.12 python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1 && good_python "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

if [ -n "$PYTHON" ]; then
    good_python "$PYTHON" || die "--python $PYTHON is not a Python >= 3.11 with venv and ensurepip"
elif ! PYTHON="$(find_python)"; then
    [ "$SYSTEM_PACKAGES" = 1 ] || die "no Python >= 3.11 with venv found (and --no-system-packages)"
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        || die "no Python >= 3.11 found; install one or run as root on a Debian/Ubuntu system"
    say "installing Python with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null
    if ! PYTHON="$(find_python)"; then  # e.g. Ubuntu 22.04, whose python3 is 3.10
        apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv >/dev/null
    fi
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    PYTHON="$(find_python)" || die "apt-get did not provide a Python >= 3.11"
fi
say "Python: $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"

# --------------------------------------------------------------------------- 2. venv + package
# Every step below keeps its caches in a scratch folder deleted at exit, so nothing lands in the
# image's /tmp (a root-owned /tmp/numba_cache left in the image would not be writable for the user
# the container runs as). HOME is kept: a user-level pip configuration may name the package index.
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
isolated() {
    env -u NUMBA_ENABLE_CUDASIM -u PYTHONPATH XDG_CACHE_HOME="$SCRATCH/cache" \
        NUMBA_CACHE_DIR="$SCRATCH/numba_cache" MPLCONFIGDIR="$SCRATCH/matplotlib" DENO_DIR="$SCRATCH/deno" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}
say "creating the virtual environment $PREFIX"
"$PYTHON" -m venv "$PREFIX"
VPY="$PREFIX/bin/python"
PINS=()
if [ -n "$CONSTRAINTS" ]; then
    PINS=(--constraint "$CONSTRAINTS")
    say "versions pinned by $CONSTRAINTS"
fi
# The pip that ensurepip bundles can be old (Debian 12: 23.0, which still runs setup.py installs).
isolated "$VPY" -m pip install --no-cache-dir --quiet --upgrade "${PINS[@]}" pip
# pip builds in the source tree; build from a clean copy so the tree is left untouched and stale
# build/ or *.egg-info folders in it cannot leak old modules into the install.
BUILD_SRC="$SCRATCH/src"
mkdir "$BUILD_SRC"
# (the same exclusions as .dockerignore)
tar -C "$SRC" -cf - --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.py[cod]' --exclude=./.numba_cache \
    --exclude=./.pytest_cache --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.whl \
    --exclude=./.gl --exclude=./demo --exclude=./work --exclude='*.sif' --exclude='*.sif.tar' . | tar -C "$BUILD_SRC" -xf -
target="$BUILD_SRC"
[ -n "$EXTRAS" ] && target="$BUILD_SRC[$EXTRAS]"
say "pip install $SRC${EXTRAS:+[$EXTRAS]}"
# No pip cache (nothing to keep in an image layer); wheels preferred over building sdists.
# (pip also compiles every module to bytecode: the image's site-packages is read-only at run time.)
if ! isolated "$VPY" -m pip install --no-cache-dir --prefer-binary --progress-bar off --quiet \
        "${PINS[@]}" "$target"; then
    [ -z "$CONSTRAINTS" ] && die "pip could not install $target"
    die "pip could not install the versions pinned in $CONSTRAINTS on Python" \
        "$("$VPY" -c 'import platform; print(platform.python_version())'): relock them for this Python" \
        "(python tools/lock_image.py) or install the newest releases with --constraints ''"
fi
[ -x "$PREFIX/bin/tractoscale" ] || die "pip did not install the tractoscale command"

# --------------------------------------------------------------------------- 3. TemplateFlow
if [ "$SKIP_TEMPLATES" = 1 ]; then
    say "skipping TemplateFlow templates (--templates skip)"
else
    say "fetching TemplateFlow MNI152NLin2009cAsym (res 1 and 2) into $TF_HOME"
    mkdir -p "$TF_HOME"
    # (on failure it prints one line naming the way to build without them)
    isolated TEMPLATEFLOW_HOME="$TF_HOME" TEMPLATEFLOW_AUTOUPDATE=0 \
        "$VPY" "$SRC/docker/fetch_templates.py" --tries "$TEMPLATE_TRIES" || exit 1
    chmod -R a+rX "$TF_HOME"
fi

if [ "$SKIP_VIEWER" = 1 ]; then
    say "skipping the reports' 3D viewer (--skip-viewer)"
else
    TEMP_NPM=0
    if ! command -v npm >/dev/null 2>&1 && [ "$SYSTEM_PACKAGES" = 1 ] && [ "$(id -u)" = 0 ] \
            && command -v apt-get >/dev/null 2>&1; then
        say "installing Node.js/npm with apt-get for this step"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends nodejs npm ca-certificates >/dev/null
        TEMP_NPM=1
    fi
    if command -v npm >/dev/null 2>&1; then
        say "installing the reports' 3D viewer (niivue) into $PREFIX/share/tractoscale/niivue"
        isolated npm_config_cache="$SCRATCH/npm" "$PREFIX/bin/tractoscale" install-viewer
    else
        say "warning: no npm: the reports will have no 3D view (tractoscale install-viewer installs it later)"
    fi
    if [ "$TEMP_NPM" = 1 ]; then
        apt-get purge -y -qq --autoremove nodejs npm >/dev/null
        apt-get clean
        rm -rf /var/lib/apt/lists/*
    fi
fi

# --------------------------------------------------------------------------- 4. checks, warm-up
say "checking the installed command"
got="$(isolated "$PREFIX/bin/tractoscale" --version)"
say "$got"
if [ -n "$EXPECT_VERSION" ] && [ "$got" != "tractoscale $EXPECT_VERSION" ]; then
    die "installed '$got' but the image is labelled version $EXPECT_VERSION"
fi
# Import every feature module once (the parser pulls their option groups).
isolated "$VPY" -c 'import bids_app.cli as c; p = c.build_parser(); print(f"  {len(p._actions)} CLI options")'
if [[ ",$EXTRAS," == *",cuda,"* ]]; then
    say "checking NVVM from the CUDA wheels (PTX for a small kernel; no GPU needed)"
    isolated "$VPY" - <<'EOF'
from numba import cuda, float32

def axpy(out, a, x, y):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]

ptx, _ = cuda.compile_ptx(axpy, (float32[:], float32, float32[:], float32[:]), cc=(7, 5))
assert ".entry" in ptx, ptx[:200]
print(f"  PTX ok ({len(ptx)} characters)")
EOF
fi

# --------------------------------------------------------------------------- 5. non-root user
if [ "$MAKE_USER" = 1 ]; then
    if id "$USER_NAME" >/dev/null 2>&1; then
        say "user $USER_NAME exists"
    else
        say "creating user $USER_NAME (uid $USER_ID)"
        groupadd --gid "$USER_ID" "$USER_NAME"
        useradd --uid "$USER_ID" --gid "$USER_ID" --create-home --shell /usr/sbin/nologin "$USER_NAME"
    fi
fi
if [ -n "$LINK_DIR" ]; then
    mkdir -p "$LINK_DIR"
    ln -sf "$PREFIX/bin/tractoscale" "$LINK_DIR/tractoscale"
    say "linked $LINK_DIR/tractoscale"
fi
chmod -R a+rX "$PREFIX"
say "done: $PREFIX/bin/tractoscale"
