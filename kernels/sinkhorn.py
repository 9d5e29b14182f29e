"""Block-sparse log-domain Sinkhorn kernels between fibres: one source, CPU and CUDA.

A fibre is one row of an array of shape (n, 3 * npts): its points' x, y, z interleaved,
already scaled so that the Euclidean norm between two rows is the (weighted) RMS distance
between matched points.  The cost of a pair is ``C = |x - y|^2 / 2``, evaluated in both
orientations (``y`` read backwards): this is the same as adding every fibre's reversed copy to
both measures, each copy with half the mass, because by symmetry a reversed copy has the same
dual potential as its original.  Nothing of size rows x columns is ever stored: each call
recomputes the costs it needs.

Costs are computed as matrix products, ``C = (|x|^2 + |y|^2) / 2 - x.y`` with the squared norms
computed once per fibre set (:meth:`CpuBackend.fibres`): one multiply-add per coordinate and
orientation instead of a subtraction, a multiply and an add, and a form that GPUs run at their
arithmetic rate.  The log-sum-exp over a row is streamed (running maximum and sum).  The
arithmetic type ``REAL`` is a build constant (:func:`kernels.compile.compile_for`):
float64 for the CPU, float32 for CUDA, where it halves the bytes read and runs at the full
rate (``precision=`` selects either on either target).  The cancellation of the matrix form costs
float32 ~1e-7 of the squared norms, far below any blur used (a relative 1e-4 of blur^2 for
fibres 100 mm from the origin and a 3 mm blur).

Sparsity: rows and columns are sorted by cluster.  ``row_cluster[i]`` is row
``i``'s cluster, ``blk_ptr``/``blk_idx`` a CSR list of the column clusters each
row cluster sees, and ``col_start[J]:col_start[J + 1]`` the columns of cluster
``J``.  One cluster with every column gives the dense problem.

The device functions are plain Python written once and compiled for each target by
:func:`kernels.compile.compile_for` (``numba.njit`` for the CPU, ``numba.cuda.jit(device=True)``
for CUDA), so each target calls its own versions; the kernels are thin drivers that hand one row
to them.  The CUDA kernels also run under the simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numba
import numpy as np

from .compile import compile_for
from .device import cudasim_enabled as _simulator_enabled
from .device import real_gpu_available as cuda_available

__all__ = ["get_backend", "available_backends", "cuda_available", "CpuBackend", "CudaBackend", "Fibres"]

_THREADS_PER_BLOCK = 128
cuda = None   # the CUDA kernels' ``cuda`` module: bound by kernels.compile for the CUDA target


REAL = np.float64   # build constant: the kernels' arithmetic type


# --------------------------------------------------------------------------- device functions
# Plain Python, written once.  They call each other by global name; the factory
# below gives each target its own namespace so that every call resolves to that
# target's compiled version.

def pair_costs(X, xn, i, xw, Y, yn, j, yw, npts):
    """Half squared distances between fibre i of X and fibre j of Y, as is and with Y reversed.

    ``xn``/``yn``: the rows' squared norms.  A fibre may come with windows (sub-fibres): fibre i
    of X is rows ``i*xw .. i*xw+xw-1``; the cost of a pair is the smallest over every window pair.
    """
    best0 = REAL(math.inf)
    best1 = REAL(math.inf)
    last = npts - 1
    dim = 3 * npts
    for a in range(xw):
        ri = i * xw + a
        for b in range(yw):
            rj = j * yw + b
            d0 = REAL(0.0)
            for k in range(dim):
                d0 += X[ri, k] * Y[rj, k]
            d1 = REAL(0.0)
            for p in range(npts):
                q = 3 * (last - p)
                d1 += X[ri, 3 * p] * Y[rj, q] + X[ri, 3 * p + 1] * Y[rj, q + 1] + X[ri, 3 * p + 2] * Y[rj, q + 2]
            nn = xn[ri] + yn[rj]
            c0 = nn - REAL(2.0) * d0
            c1 = nn - REAL(2.0) * d1
            if c0 < best0:
                best0 = c0
            if c1 < best1:
                best1 = c1
    # rounding can take the difference of two close fibres' norms below zero
    return REAL(0.5) * max(best0, REAL(0.0)), REAL(0.5) * max(best1, REAL(0.0))


def lse_push(m, s, v):
    """Streaming log-sum-exp: the running (max, sum of exp(value - max)) after adding v."""
    if v <= m:
        if v < m - REAL(60.0):  # below exp(-60) of the running max: no effect
            return m, s
        return m, s + REAL(math.exp(v - m))
    return v, s * REAL(math.exp(m - v)) + REAL(1.0)


def row_softmin(i, X, xn, xw, Y, yn, yw, h, inv_eps, npts, row_cluster, blk_ptr, blk_idx, col_start):
    """-eps log sum_j sum_orientations exp(h_j - C_ij/eps) over the blocks row i sees (+inf if none)."""
    ci = row_cluster[i]
    m = REAL(-math.inf)
    s = REAL(0.0)
    for k in range(blk_ptr[ci], blk_ptr[ci + 1]):
        cj = blk_idx[k]
        for j in range(col_start[cj], col_start[cj + 1]):
            c0, c1 = pair_costs(X, xn, i, xw, Y, yn, j, yw, npts)
            hj = h[j]
            m, s = lse_push(m, s, hj - c0 * inv_eps)
            m, s = lse_push(m, s, hj - c1 * inv_eps)
    if s <= REAL(0.0):
        return REAL(math.inf)
    return -(m + REAL(math.log(s))) / inv_eps


def row_class_mass(i, out, X, xn, xw, Y, yn, yw, h, fi_eps, inv_eps, npts, row_cluster, blk_ptr, blk_idx,
                   col_start, col_class):
    """out[i, c] += sum over columns j of class c of exp(f_i/eps + h_j - C_ij/eps), both orientations."""
    ci = row_cluster[i]
    for k in range(blk_ptr[ci], blk_ptr[ci + 1]):
        cj = blk_idx[k]
        acc = REAL(0.0)
        for j in range(col_start[cj], col_start[cj + 1]):
            c0, c1 = pair_costs(X, xn, i, xw, Y, yn, j, yw, npts)
            base = fi_eps + h[j]
            acc += REAL(math.exp(base - c0 * inv_eps)) + REAL(math.exp(base - c1 * inv_eps))
        out[i, col_class[cj]] += acc


def row_nearest(i, X, xn, xw, Y, yn, yw, npts, row_cluster, blk_ptr, blk_idx, col_start):
    """Closest column (either orientation) among the blocks row i sees, and its cost."""
    ci = row_cluster[i]
    best = REAL(math.inf)
    arg = -1
    for k in range(blk_ptr[ci], blk_ptr[ci + 1]):
        cj = blk_idx[k]
        for j in range(col_start[cj], col_start[cj + 1]):
            c0, c1 = pair_costs(X, xn, i, xw, Y, yn, j, yw, npts)
            c = min(c0, c1)
            if c < best:
                best = c
                arg = j
    return arg, best


_DEVICE_FUNCTIONS = (pair_costs, lse_push, row_softmin, row_class_mass, row_nearest)


# --------------------------------------------------------------------------- CPU kernels (sources)

def _softmin_cpu(out, X, xn, xw, Y, yn, yw, h, inv_eps, lam, npts, row_cluster, blk_ptr, blk_idx, col_start):
    ie = REAL(inv_eps)
    for i in numba.prange(out.shape[0]):
        out[i] = lam * row_softmin(i, X, xn, xw, Y, yn, yw, h, ie, npts, row_cluster, blk_ptr, blk_idx,
                                   col_start)


def _class_mass_cpu(out, X, xn, xw, Y, yn, yw, h, f, inv_eps, npts, row_cluster, blk_ptr, blk_idx,
                    col_start, col_class):
    ie = REAL(inv_eps)
    for i in numba.prange(out.shape[0]):
        if math.isfinite(f[i]):
            row_class_mass(i, out, X, xn, xw, Y, yn, yw, h, REAL(f[i] * inv_eps), ie, npts, row_cluster,
                           blk_ptr, blk_idx, col_start, col_class)


def _nearest_cpu(arg, cost, X, xn, xw, Y, yn, yw, npts, row_cluster, blk_ptr, blk_idx, col_start):
    for i in numba.prange(arg.shape[0]):
        a, c = row_nearest(i, X, xn, xw, Y, yn, yw, npts, row_cluster, blk_ptr, blk_idx, col_start)
        arg[i] = a
        cost[i] = c


# --------------------------------------------------------------------------- CUDA kernels (sources)

def _softmin_gpu(out, X, xn, xw, Y, yn, yw, h, inv_eps, lam, npts, row_cluster, blk_ptr, blk_idx, col_start):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = lam * row_softmin(i, X, xn, xw, Y, yn, yw, h, REAL(inv_eps), npts, row_cluster, blk_ptr,
                                   blk_idx, col_start)


def _class_mass_gpu(out, X, xn, xw, Y, yn, yw, h, f, inv_eps, npts, row_cluster, blk_ptr, blk_idx,
                    col_start, col_class):
    i = cuda.grid(1)
    if i < out.shape[0]:
        if math.isfinite(f[i]):
            row_class_mass(i, out, X, xn, xw, Y, yn, yw, h, REAL(f[i] * inv_eps), REAL(inv_eps), npts,
                           row_cluster, blk_ptr, blk_idx, col_start, col_class)


def _nearest_gpu(arg, cost, X, xn, xw, Y, yn, yw, npts, row_cluster, blk_ptr, blk_idx, col_start):
    i = cuda.grid(1)
    if i < arg.shape[0]:
        a, c = row_nearest(i, X, xn, xw, Y, yn, yw, npts, row_cluster, blk_ptr, blk_idx, col_start)
        arg[i] = a
        cost[i] = c


_CPU_KERNELS = (_softmin_cpu, _class_mass_cpu, _nearest_cpu)
_CUDA_KERNELS = (_softmin_gpu, _class_mass_gpu, _nearest_gpu)
# reassociation lets LLVM vectorise the distance sums (CPU only; no finite-math assumptions,
# the kernels use infinities)
_CPU_OPTIONS = {"pair_costs": {"fastmath": {"reassoc", "contract", "arcp", "nsz"}}}


# --------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Fibres:
    """A fibre set in the kernels' layout on one backend: rows (REAL, C order) and their squared
    norms (computed once in float64 and rounded)."""

    rows: object
    norms: object

    @property
    def shape(self):
        return self.rows.shape


class CpuBackend:
    """Numba CPU kernels (threads: ``numba.set_num_threads``); float64 unless ``precision``.

    ``X`` holds ``n * xw`` rows (``xw`` windows per fibre, fibre-major), ``Y`` ``m * yw``.
    """

    name = "cpu"
    default_precision = "float64"

    def __init__(self, precision: str | None = None):
        self.precision = precision or self.default_precision
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be float32 or float64, not {self.precision!r}")
        self.real = np.dtype(self.precision)
        self._softmin, self._class_mass, self._nearest = _kernels(self.name, self.precision)

    def to_device(self, a: np.ndarray):
        return np.ascontiguousarray(a)

    def fibres(self, a: np.ndarray) -> Fibres:
        """Fibre rows (2D, or (n, windows, 3 * npts)) in the kernels' layout on this backend (the
        kernels take plain arrays too, converting them at each call)."""
        a = np.asarray(a, dtype=np.float64)
        a = a.reshape(-1, a.shape[-1])
        return Fibres(self.to_device(np.ascontiguousarray(a, dtype=self.real)),
                      self.to_device(np.einsum("ij,ij->i", a, a).astype(self.real)))

    def _vec(self, a):
        return self.to_device(np.ascontiguousarray(a, dtype=self.real))

    def _fib(self, a) -> Fibres:
        return a if isinstance(a, Fibres) else self.fibres(a)

    def _launch(self, kernel, n, *args):
        kernel(*args)

    def _out(self, shape, zero=False, dtype=np.float64):
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)

    def _host(self, a):
        return a

    def softmin(self, X, xw, Y, yw, h, eps, lam, npts, row_cluster, blk_ptr, blk_idx, col_start):
        """``lam * (-eps log sum_j sum_orient exp(h_j - C_ij/eps))`` for every fibre of ``X``."""
        X, Y = self._fib(X), self._fib(Y)
        n = X.shape[0] // xw
        out = self._out(n)
        self._launch(self._softmin, n, out, X.rows, X.norms, xw, Y.rows, Y.norms, yw, self._vec(h), 1.0 / eps,
                     lam, npts, row_cluster, blk_ptr, blk_idx, col_start)
        return self._host(out)

    def class_mass(self, X, xw, Y, yw, h, f, eps, npts, row_cluster, blk_ptr, blk_idx, col_start,
                   col_class, n_classes):
        """Per fibre of X and class: ``sum_{j in class} exp(f_i/eps + h_j - C_ij/eps)`` (n x classes)."""
        X, Y = self._fib(X), self._fib(Y)
        n = X.shape[0] // xw
        out = self._out((n, n_classes), zero=True)
        self._launch(self._class_mass, n, out, X.rows, X.norms, xw, Y.rows, Y.norms, yw, self._vec(h),
                     self._vec(f), 1.0 / eps, npts, row_cluster, blk_ptr, blk_idx, col_start, col_class)
        return self._host(out)

    def nearest(self, X, xw, Y, yw, npts, row_cluster, blk_ptr, blk_idx, col_start):
        """Closest fibre of Y (any window, either orientation) for every fibre of X, and its cost."""
        X, Y = self._fib(X), self._fib(Y)
        n = X.shape[0] // xw
        arg = self._out(n, dtype=np.int64)
        cost = self._out(n)
        self._launch(self._nearest, n, arg, cost, X.rows, X.norms, xw, Y.rows, Y.norms, yw, npts, row_cluster,
                     blk_ptr, blk_idx, col_start)
        return self._host(arg), self._host(cost)


class CudaBackend(CpuBackend):
    """The same kernels compiled with ``numba.cuda`` (a GPU, or the CUDA simulator); float32
    unless ``precision``."""

    name = "cuda"
    default_precision = "float32"

    def __init__(self, precision: str | None = None):
        from numba import cuda
        self._cuda = cuda
        super().__init__(precision)

    def to_device(self, a: np.ndarray):
        return self._cuda.to_device(np.ascontiguousarray(a))

    def _out(self, shape, zero=False, dtype=np.float64):
        if zero:
            return self._cuda.to_device(np.zeros(shape, dtype))
        return self._cuda.device_array(shape, dtype=dtype)

    def _host(self, a):
        return a.copy_to_host()

    def _launch(self, kernel, n, *args):
        blocks = max(1, (n + _THREADS_PER_BLOCK - 1) // _THREADS_PER_BLOCK)
        kernel[blocks, _THREADS_PER_BLOCK](*args)


_KERNELS: dict = {}
_LOCK = threading.Lock()


def _kernels(target: str, precision: str = "float64"):
    """(softmin, class mass, nearest) compiled for ``target`` in ``precision``, once per process."""
    with _LOCK:
        if (target, precision) not in _KERNELS:
            cpu = target == "cpu"
            kernels = _CPU_KERNELS if cpu else _CUDA_KERNELS
            constants = None if precision == "float64" else {"REAL": np.float32}
            fns = compile_for(target, device=_DEVICE_FUNCTIONS, kernels=kernels, constants=constants,
                              options=_CPU_OPTIONS if cpu else None)
            _KERNELS[target, precision] = tuple(fns[k.__name__] for k in kernels)
        return _KERNELS[target, precision]


def available_backends() -> list[str]:
    names = ["cpu"]
    if cuda_available() or _simulator_enabled():
        names.append("cuda")
    return names


def get_backend(device: str = "auto", precision: str | None = None):
    """``"cpu"``, ``"cuda"`` (a GPU or the simulator) or ``"auto"`` (a real GPU if present, else
    CPU); ``precision``: the kernels' arithmetic (default: float64 on the CPU, float32 on CUDA)."""
    if device == "auto":
        return CudaBackend(precision) if cuda_available() else CpuBackend(precision)
    if device == "cpu":
        return CpuBackend(precision)
    if device == "cuda":
        if not (cuda_available() or _simulator_enabled()):
            raise RuntimeError("no CUDA device available (and NUMBA_ENABLE_CUDASIM is not set)")
        return CudaBackend(precision)
    raise ValueError(f"unknown device {device!r}: choose auto, cpu or cuda")
