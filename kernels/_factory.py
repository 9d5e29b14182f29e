"""Compile one set of plain Python functions for one target (``cpu`` or ``cuda``).

Each function is re-created with a private globals dictionary in which its sibling functions are
replaced by their compiled versions for the same target, so ``track_seed`` compiled for CUDA calls
the CUDA ``eval_pmf`` and the CPU one calls the CPU ``eval_pmf``.
"""
from __future__ import annotations

import types


def _rebind(func, namespace: dict):
    new = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__,
                             func.__closure__)
    new.__qualname__ = func.__qualname__
    new.__module__ = func.__module__
    new.__doc__ = func.__doc__
    return new


def compile_for(target: str, device_functions, parallel_functions=(), cache: bool = True) -> dict:
    """Return ``{name: compiled function}`` for ``target``.

    ``device_functions`` become ``njit`` (cpu) or ``cuda.jit(device=True)`` (cuda) functions;
    ``parallel_functions`` (cpu only) become ``njit(parallel=True)`` drivers.
    """
    if not device_functions:
        return {}
    namespace = dict(device_functions[0].__globals__)
    compiled = {}
    if target == "cpu":
        from numba import njit
        for f in device_functions:
            compiled[f.__name__] = njit(cache=cache)(_rebind(f, namespace))
        for f in parallel_functions:
            compiled[f.__name__] = njit(parallel=True, cache=cache)(_rebind(f, namespace))
    elif target == "cuda":
        from numba import cuda
        for f in device_functions:
            compiled[f.__name__] = cuda.jit(device=True)(_rebind(f, namespace))
    else:
        raise ValueError(f"unknown target {target!r}")
    namespace.update(compiled)
    return compiled
