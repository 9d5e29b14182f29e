"""The tracking functions compiled for CUDA: one thread per seed.

Import only when CUDA (or the simulator) is wanted: compiling happens on first launch.
"""
from __future__ import annotations

import warnings

import numpy as np
from numba import cuda

from . import tracking_core as _core
from ._factory import compile_for

MAX_VERTS = 512      # sphere vertices (a hemisphere of repulsion724 has 362)
MAX_COEFS = 153      # SH coefficients up to order 16
MAX_CROSS = 8        # peaks per seed
MAX_DWI = 160        # diffusion-weighted volumes for the bootstrap
MAX_WORK = 16 + 3 * MAX_DWI
THREADS_PER_BLOCK = 64

_dev = compile_for("cuda", _core.DEVICE_FUNCTIONS)
_track_seed = _dev["track_seed"]


@cuda.jit
def _track_kernel(seeds, first_index, odf, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm,
                  out, out_n):
    i = cuda.grid(1)
    if i < seeds.shape[0]:
        pmf = cuda.local.array(MAX_VERTS, np.float32)
        coef = cuda.local.array(MAX_COEFS, np.float64)
        peaks = cuda.local.array(MAX_CROSS, np.int32)
        work = cuda.local.array(MAX_WORK, np.float64)
        _track_seed(i, first_index + i, seeds[i, 0], seeds[i, 1], seeds[i, 2], odf, bmat, verts,
                    nbrs, stop, aff, fp, ip, bdata, bootm, out, out_n, pmf, coef, peaks, work)


def check_limits(nverts: int, ncoef: int, max_cross: int, ndwi: int = 0) -> None:
    if nverts > MAX_VERTS or ncoef > MAX_COEFS or max_cross > MAX_CROSS or ndwi > MAX_DWI:
        raise ValueError(f"CUDA kernel limits: <= {MAX_VERTS} sphere vertices, <= {MAX_COEFS} SH "
                         f"coefficients, <= {MAX_CROSS} peaks per seed, <= {MAX_DWI} DWI volumes "
                         "for the bootstrap")


def launch(seeds, first_index, odf, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm, out,
           out_n) -> None:
    """Launch on device arrays (or host arrays; numba copies them)."""
    n = seeds.shape[0]
    blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with warnings.catch_warnings():
        # the simulator runs the kernel on numpy scalars, whose uint64 hash arithmetic wraps
        # around on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        _track_kernel[blocks, THREADS_PER_BLOCK](seeds, np.int64(first_index), odf, bmat, verts,
                                                  nbrs, stop, aff, fp, ip, bdata, bootm, out,
                                                  out_n)
        cuda.synchronize()


@cuda.jit
def _gather_kernel(out, slots, offsets, lengths, positions):
    j = cuda.grid(1)
    if j < slots.shape[0]:
        s = slots[j]
        o = offsets[j]
        for t in range(lengths[j]):
            positions[o + t, 0] = out[s, t, 0]
            positions[o + t, 1] = out[s, t, 1]
            positions[o + t, 2] = out[s, t, 2]


def free_memory() -> int:
    try:
        free, _total = cuda.current_context().get_memory_info()
        return int(free)
    except Exception:
        return 1 << 30


def upload(data) -> tuple:
    """Copy the read-only arrays to the GPU once per run."""
    return tuple(cuda.to_device(np.ascontiguousarray(a)) for a in (
        data.odf, data.bmat, data.verts, data.nbrs, data.stop, data.affine, data.fp, data.ip,
        data.bdata, data.bootm))


def run_chunk(dev_arrays, seeds_vox, first_index, n_slots, max_pts, min_pts):
    """Track a chunk on the GPU, pack kept streamlines on the GPU, copy back only their points."""
    d_seeds = cuda.to_device(seeds_vox)
    d_out = cuda.device_array((n_slots, max_pts, 3), dtype=np.float32)
    d_n = cuda.device_array(n_slots, dtype=np.int32)
    launch(d_seeds, first_index, *dev_arrays, d_out, d_n)
    out_n = d_n.copy_to_host()
    slots = np.flatnonzero(out_n >= min_pts).astype(np.int64)
    lengths = out_n[slots].astype(np.int64)
    offsets = np.zeros(len(slots), dtype=np.int64)
    if len(slots) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    total = int(lengths.sum())
    if total == 0:
        return np.zeros((0, 3), np.float32), lengths, slots
    d_pos = cuda.device_array((total, 3), dtype=np.float32)
    blocks = (len(slots) + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    _gather_kernel[blocks, THREADS_PER_BLOCK](d_out, cuda.to_device(slots), cuda.to_device(offsets),
                                              cuda.to_device(lengths), d_pos)
    return d_pos.copy_to_host(), lengths, slots
