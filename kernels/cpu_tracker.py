"""The tracking functions compiled for the CPU (``numba.njit``; drivers parallel over seeds)."""
from __future__ import annotations

from . import tracking_core as _core
from ._factory import compile_for

_fns = compile_for("cpu", _core.DEVICE_FUNCTIONS, _core.CPU_PARALLEL_FUNCTIONS)

track_chunk = _fns["track_chunk_cpu"]
place_seeds = _fns["place_seeds"]
gather_points = _fns["gather_points"]
