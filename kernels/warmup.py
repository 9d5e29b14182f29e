"""Compile the CPU kernels ahead of time into a portable Numba cache, and install such a cache.

Numba compiles a kernel on its first call and keeps it in ``NUMBA_CACHE_DIR``; an entry is
keyed on the source file (path, time stamp, bytecode), the argument types and the CPU it was
compiled for.  A container whose cache folder is a fresh ``/tmp`` therefore compiled the tracking
kernels (~15 s) at every start.  Compiled for Numba's ``generic`` CPU (``NUMBA_CPU_NAME=generic``:
plain x86-64 or AArch64 code, no host-specific instructions) the entries suit any machine:

    python -m kernels.warmup --portable /opt/tractoscale/share/tractoscale/numba-cache

builds them (the image does this once, at build time, in its own step), and
:func:`use_prebuilt_cache`, called by the application before Numba is imported, copies the
missing entries into the run's cache folder and selects the ``generic`` CPU so that they match.
Nothing changes where no prebuilt cache exists (a pip install).  GPU kernels are not included:
they are cached for the GPU that compiles them, on their first run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PREBUILT_ENV = "TRACTOSCALE_NUMBA_PREBUILT"


def prebuilt_cache_dir() -> Path:
    """Where a prebuilt portable cache is looked for: ``$TRACTOSCALE_NUMBA_PREBUILT``, else
    ``share/tractoscale/numba-cache`` under the installation's prefix."""
    return Path(os.environ.get(PREBUILT_ENV) or Path(sys.prefix) / "share" / "tractoscale" / "numba-cache")


def compile_kernels() -> dict:
    """Call every CPU kernel of the library once on tiny inputs of the types the application
    passes, so that Numba compiles (or loads) them.  Returns seconds per kernel family."""
    import numpy as np

    times = {}
    t0 = time.perf_counter()
    from .engine import MaskSeeder, TrackParams, Tracker, iter_chunks, prepare
    shape = (5, 4, 3)
    sh = np.zeros(shape + (15,), np.float32)
    sh[..., 0] = 1.0
    sh[..., 3] = 0.5
    fa = np.full(shape, 0.5, np.float32)
    data = prepare(sh=sh, affine=np.eye(4), params=TrackParams(max_length=5.0, min_length=0.0),
                   stop_map=fa, mask=fa > 0)
    for _ in iter_chunks(Tracker(data, "cpu"), MaskSeeder(fa > 0, per_voxel=1), chunk_size=16):
        pass
    times["tracking"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from .tfce import max_tfce_batch, neighbour_graph, tfce, tfce_graph
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    tfce(np.where(mask, 2.0, 0.0))
    _, indptr, indices = neighbour_graph(mask)
    values = np.linspace(0.5, 2.0, int(mask.sum()))
    tfce_graph(values, indptr, indices, 0.0, 2.0, 1.0)
    max_tfce_batch(np.stack([values, values[::-1]]), indptr, indices, 2.0, 1.0)
    times["tfce"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from .sinkhorn import CpuBackend
    times.update(_sinkhorn(CpuBackend()))
    times["sinkhorn"] = time.perf_counter() - t0
    return times


def _sinkhorn(backend) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    X = backend.fibres(rng.normal(size=(4, 12)))
    Y = backend.fibres(rng.normal(size=(3, 12)))
    one = backend.to_device(np.zeros(4, np.int64))
    ptr = backend.to_device(np.array([0, 1], np.int64))
    idx = backend.to_device(np.array([0], np.int64))
    cols = backend.to_device(np.array([0, 3], np.int64))
    h = np.zeros(3)
    backend.softmin(X, 1, Y, 1, h, 1.0, 1.0, 4, one, ptr, idx, cols)
    backend.class_mass(X, 1, Y, 1, h, np.zeros(4), 1.0, 4, one, ptr, idx, cols,
                       backend.to_device(np.zeros(1, np.int64)), 1)
    backend.nearest(X, 1, Y, 1, 4, one, ptr, idx, cols)
    return {}


def build_portable_cache(path: Path, python: str = sys.executable) -> float:
    """Compile the kernels for the ``generic`` CPU into ``path`` (in a fresh process, since
    Numba reads its settings when it is imported); returns seconds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(path.resolve()))
    t0 = time.perf_counter()
    subprocess.run([python, "-c", "from kernels.warmup import compile_kernels; print(compile_kernels())"],
                   check=True, env=env)
    return time.perf_counter() - t0


def install_prebuilt_cache(prebuilt: Path, cache_dir: Path) -> int:
    """Copy the entries of ``prebuilt`` that ``cache_dir`` lacks; returns how many were copied."""
    prebuilt, cache_dir = Path(prebuilt), Path(cache_dir)
    n = 0
    for src in prebuilt.rglob("*"):
        if not src.is_file() or src.suffix not in (".nbi", ".nbc"):
            continue
        dst = cache_dir / src.relative_to(prebuilt)
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)       # a concurrent run sees the whole file or none
        n += 1
    return n


def use_prebuilt_cache() -> int:
    """If a prebuilt portable cache exists (see :func:`prebuilt_cache_dir`) and Numba's CPU was
    not chosen otherwise, select Numba's ``generic`` CPU and copy the cache's missing entries into
    ``NUMBA_CACHE_DIR``.  Call before Numba is imported.  Returns the entries copied (-1: none
    used)."""
    prebuilt = prebuilt_cache_dir()
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    if not cache_dir or not prebuilt.is_dir():
        return -1
    if os.environ.get("NUMBA_CPU_NAME", "generic") != "generic" or os.environ.get("NUMBA_CPU_FEATURES"):
        return -1
    os.environ["NUMBA_CPU_NAME"] = "generic"
    if "numba" in sys.modules:        # too late for the environment alone
        from numba.core import config
        config.reload_config()
    try:
        return install_prebuilt_cache(prebuilt, Path(cache_dir))
    except OSError:
        return 0        # an unwritable cache folder: the kernels compile as usual


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.warmup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--portable", type=Path, metavar="DIR",
                   help="build a portable (generic CPU) cache in DIR instead of warming NUMBA_CACHE_DIR")
    a = p.parse_args(argv)
    if a.portable:
        seconds = build_portable_cache(a.portable)
        files = [f for f in a.portable.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        print(f"portable Numba cache: {len(files)} files, {size / 2**20:.1f} MB in {a.portable} "
              f"({seconds:.0f} s)")
    else:
        print(compile_kernels())
    return 0


if __name__ == "__main__":
    sys.exit(main())
