"""The tracking functions compiled for the CPU (``numba.njit``; drivers parallel over seeds).

One generic build (the algorithm, ODF mode and stopping rule are read at run time) in float64,
cached on disk; a float32 build is made on request (the CUDA builds' arithmetic, for comparisons).
"""
from __future__ import annotations

import threading

import numpy as np

from . import tracking_core as _core
from .compile import compile_for

_fns = compile_for("cpu", device=_core.DEVICE_FUNCTIONS, kernels=_core.CPU_KERNELS)

track_chunk = _fns["track_chunk_cpu"]
place_seeds = _fns["place_seeds_cpu"]
gather_points = _fns["gather_points_cpu"]

_BUILDS = {"float64": track_chunk}
_LOCK = threading.Lock()


def track_chunk_for(precision: str = "float64"):
    """The CPU tracking driver whose arithmetic is ``precision`` (float64 or float32)."""
    with _LOCK:
        if precision not in _BUILDS:
            if precision != "float32":
                raise ValueError(f"precision must be float64 or float32, not {precision!r}")
            fns = compile_for("cpu", device=_core.DEVICE_FUNCTIONS, kernels=(_core.track_chunk_cpu,),
                              constants=_core.precision_constants(np.float32))
            _BUILDS[precision] = fns["track_chunk_cpu"]
        return _BUILDS[precision]
