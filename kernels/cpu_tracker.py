"""The tracking functions compiled for the CPU (``numba.njit``; drivers parallel over seeds)."""
from __future__ import annotations

from . import tracking_core as _core
from .compile import compile_for

_fns = compile_for("cpu", device=_core.DEVICE_FUNCTIONS, kernels=_core.CPU_KERNELS)

track_chunk = _fns["track_chunk_cpu"]
place_seeds = _fns["place_seeds_cpu"]
gather_points = _fns["gather_points_cpu"]
