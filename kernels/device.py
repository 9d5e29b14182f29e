"""Choosing the compute device: a real CUDA GPU or the CPU.

The CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) is not a GPU: ``auto`` ignores it and ``cuda``
refuses it, unless ``TRACTOSCALE_ALLOW_CUDASIM=1`` (used by tests to run the CUDA code path).
"""
from __future__ import annotations

import os

from .errors import DeviceError, ParameterError

DEVICES = ("auto", "cpu", "cuda")


def cudasim_enabled() -> bool:
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def real_gpu_available() -> bool:
    """True when a CUDA driver and at least one real GPU are usable."""
    if cudasim_enabled():
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available()) and len(cuda.gpus) > 0
    except Exception:  # numba-cuda missing or driver broken
        return False


def cuda_usable() -> bool:
    """A real GPU, or the simulator when TRACTOSCALE_ALLOW_CUDASIM=1."""
    if real_gpu_available():
        return True
    return cudasim_enabled() and os.environ.get("TRACTOSCALE_ALLOW_CUDASIM") == "1"


def select_device(requested: str = "auto") -> str:
    """Resolve ``auto|cpu|cuda`` to ``cpu`` or ``cuda``; ``cuda`` without a GPU is a :class:`DeviceError`."""
    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise ParameterError("device", f"must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return "cuda" if cuda_usable() else "cpu"
    if not cuda_usable():
        why = ("only the CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1)" if cudasim_enabled()
               else "no CUDA GPU or driver was found (is the container run with --nv / --gpus?)")
        raise DeviceError(f"CUDA was requested but {why}; use the CPU (or auto)")
    return "cuda"


def parse_gpus(text) -> list[int] | None:
    """``None``/``"all"``: every visible GPU; ``"0,2"`` (or a list): those GPU numbers."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ids = [int(str(x).strip()) for x in items]
    except ValueError:
        raise ParameterError("gpus", f"must be 'all' or GPU numbers separated by commas, e.g. 0,2 "
                                     f"(got {text!r})") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ParameterError("gpus", f"must list distinct GPU numbers >= 0 (got {text!r})")
    return ids


def check_gpus(text) -> list[int] | None:
    """:func:`parse_gpus`, and each number must be a visible GPU (when a real GPU is present)."""
    ids = parse_gpus(text)
    if ids is None or not real_gpu_available():
        return ids
    from numba import cuda
    n = len(cuda.gpus)
    missing = [g for g in ids if g >= n]
    if missing:
        raise ParameterError("gpus", f"GPU {missing[0]} is not visible: this machine shows {n} "
                                     f"(numbers 0 to {n - 1}; CUDA_VISIBLE_DEVICES renumbers them)")
    return ids
