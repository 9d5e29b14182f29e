"""The tracking functions compiled for CUDA: one thread per seed.

Import only when CUDA (or the simulator) is wanted: compiling happens on first launch.
"""
from __future__ import annotations

import warnings

import numpy as np
from numba import cuda

from . import tracking_core as _core
from .compile import compile_for

THREADS_PER_BLOCK = 64

_fns = compile_for("cuda", device=_core.DEVICE_FUNCTIONS, kernels=_core.CUDA_KERNELS)
track_kernel = _fns["track_chunk_cuda"]
gather_kernel = _fns["gather_points_cuda"]


def check_limits(nverts: int, ncoef: int, max_cross: int, ndwi: int = 0) -> None:
    if nverts > _core.CUDA_MAX_VERTS or ncoef > _core.CUDA_MAX_COEFS or max_cross > _core.CUDA_MAX_CROSS \
            or ndwi > _core.CUDA_MAX_DWI:
        raise ValueError(f"CUDA kernel limits: <= {_core.CUDA_MAX_VERTS} sphere vertices, <= "
                         f"{_core.CUDA_MAX_COEFS} SH coefficients, <= {_core.CUDA_MAX_CROSS} peaks per "
                         f"seed, <= {_core.CUDA_MAX_DWI} DWI volumes for the bootstrap")


def _blocks(n: int) -> int:
    return max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


def launch(seeds, first_index, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata,
           bootm, out, out_n) -> None:
    """Launch on device arrays (or host arrays; numba copies them)."""
    with warnings.catch_warnings():
        # the simulator runs the kernel on numpy scalars, whose uint64 hash arithmetic wraps
        # around on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        track_kernel[_blocks(seeds.shape[0]), THREADS_PER_BLOCK](
            seeds, np.int64(first_index), vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm,
            out, out_n)
        cuda.synchronize()


def free_memory() -> int:
    try:
        free, _total = cuda.current_context().get_memory_info()
        return int(free)
    except Exception:
        return 1 << 30


def upload(data) -> tuple:
    """Copy the read-only arrays to the GPU once per run."""
    return tuple(cuda.to_device(np.ascontiguousarray(a)) for a in (
        *data.odf_arrays, data.bmat, data.verts, data.nbrs, data.stop, data.affine, data.fp,
        data.ip, data.bdata, data.bootm))


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
    gather_kernel[_blocks(len(slots)), THREADS_PER_BLOCK](
        d_out, cuda.to_device(slots), cuda.to_device(offsets), cuda.to_device(lengths), d_pos)
    return d_pos.copy_to_host(), lengths, slots
