"""The one compile helper of every kernel family (tracking, Sinkhorn, TFCE): plain Python -> CPU or CUDA.

A kernel family is written once as plain Python functions of two kinds:

* **device functions**, called by other kernel code: ``numba.njit`` on the CPU (also callable from
  Python), ``numba.cuda.jit(device=True)`` on CUDA;
* **kernels**, the entry points the host launches: on the CPU ``numba.njit(parallel=True)`` drivers
  that loop with ``prange``; on CUDA ``numba.cuda.jit`` kernels that take one item per thread.  A
  driver only hands one item to a device function, so the algorithm itself exists once.

Each function is rebuilt (same code object) with a private globals dictionary in which its sibling
functions are replaced by their versions compiled for the same target, so ``track_seed`` compiled
for CUDA calls the CUDA ``eval_pmf``.  ``constants`` (ints, floats, bools) are injected into that
dictionary too: compiled code reads globals as compile-time constants, which is how a family is
specialised (array sizes, switches) without a second copy of its source.  On CUDA the name ``cuda``
is bound to ``numba.cuda``.

Caching: CPU functions use Numba's on-disk cache (``NUMBA_CACHE_DIR``).  Numba keys a cache entry
on the function's qualified name and source file, not on the globals it captured, so functions
compiled with ``constants`` get a qualified name suffixed with a digest of them: two
specialisations never share a cache entry.  CUDA kernels compile when first launched and are
cached the same way (``cuda.jit(cache=True)``, keyed also on the compute capability and the CUDA
version); their device functions are compiled into them.
"""
from __future__ import annotations

import hashlib
import types

TARGETS = ("cpu", "cuda")


def _rebind(func, namespace: dict, suffix: str = ""):
    new = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__,
                             func.__closure__)
    new.__qualname__ = func.__qualname__ + suffix
    new.__module__ = func.__module__
    new.__doc__ = func.__doc__
    return new


def _suffix(constants: dict | None) -> str:
    if not constants:
        return ""
    text = repr(sorted((k, repr(v)) for k, v in constants.items()))
    return "__" + hashlib.sha1(text.encode()).hexdigest()[:10]


def compile_for(target: str, *, device=(), kernels=(), constants: dict | None = None,
                options: dict | None = None, cache: bool = True) -> dict:
    """``{name: compiled function}`` of one kernel family for ``target`` (``cpu`` or ``cuda``).

    ``device``: device functions; ``kernels``: entry points for this target (CPU drivers or CUDA
    kernels); ``constants``: globals injected as compile-time constants; ``options``: extra Numba
    options per function name (e.g. ``{"pair_costs": {"fastmath": {...}}}``, CPU only).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    funcs = tuple(device) + tuple(kernels)
    if not funcs:
        return {}
    namespace = dict(funcs[0].__globals__)
    namespace.update(constants or {})
    suffix = _suffix(constants)
    options = options or {}
    compiled = {}
    if target == "cpu":
        from numba import njit
        for f in device:
            compiled[f.__name__] = njit(cache=cache, **options.get(f.__name__, {}))(_rebind(f, namespace, suffix))
        for f in kernels:
            compiled[f.__name__] = njit(parallel=True, cache=cache, **options.get(f.__name__, {}))(
                _rebind(f, namespace, suffix))
    else:
        from numba import cuda
        namespace["cuda"] = cuda
        for f in device:
            compiled[f.__name__] = cuda.jit(device=True)(_rebind(f, namespace, suffix))
        for f in kernels:
            compiled[f.__name__] = cuda.jit(cache=cache)(_rebind(f, namespace, suffix))
    namespace.update(compiled)
    return compiled
