"""Many small least-squares problems with linear inequality constraints, one per voxel, that share
their design matrix and their constraints: multi-shell multi-tissue CSD (Jeurissen et al. 2014) and
its kin.

For each voxel ``v``::

    minimise  0.5 x' H x - g_v' x     subject to   c_k' x >= 0,  k < m       (H = X' X, g_v = X' y_v)

solved exactly by the dual active-set method of Goldfarb & Idnani (1983): it starts at the
unconstrained minimum ``x0 = P y_v`` (``P = H^-1 X'``) and adds the most violated constraint,
dropping one whenever its multiplier would turn negative, until no constraint is violated.

Everything the method needs depends on the voxel only through ``x0``, so it is written in the
constraints' own space with shared matrices computed once: ``K = C H^-1`` (row k is the primal
move that constraint k's multiplier makes) and the Gram matrix ``M = C H^-1 C'`` (m x m).  With
the active set A and its multipliers u_A,

    x = x0 + K_A' u_A,      C x = C x0 + M_{:,A} u_A,

so a voxel keeps only the Cholesky factor of ``M_AA`` (q x q, updated by one row per constraint
added, by Givens rotations per constraint dropped): a step costs O(q^2), a search for the most
violated constraint O(m q), and no n x n basis is rotated (Goldfarb and Idnani's J).  The last
check of feasibility is done on ``x`` itself (``C x``, O(m n)); the active constraints' residual
is refined once, so the answer meets the KKT conditions to rounding.  Consecutive voxels are
warm-started from each other's active set (one whose warm start runs into the iteration limit, a
degenerate path cycling in rounding, is solved again from scratch).

The algorithm is written once as device functions and compiled by :mod:`kernels.compile` for the
CPU (a ``prange`` driver, a few long runs of voxels per thread) and for CUDA (one thread per run of
``RUN_GPU`` voxels); each run's scratch is one row of a work array, so the same code runs on both.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import prange

from .compile import compile_for

cuda = None   # bound to numba.cuda by kernels.compile for the CUDA target

OK, NOT_CONVERGED, INFEASIBLE = 0, 1, 2
STATUS_NAMES = {OK: "ok", NOT_CONVERGED: "iteration limit", INFEASIBLE: "infeasible"}
RUN_GPU = 32          # consecutive voxels solved by one CUDA thread, each warm-started from the previous


def work_sizes(n: int, m: int) -> tuple[int, int]:
    """Float and int scratch per run of voxels for ``n`` unknowns and ``m`` constraints."""
    return n * n + 4 * n + 1 + 2 * m, n + m + 1


def _dot(a, oa, b, ob, n):
    """sum a[oa + i] * b[ob + i], i < n (flat arrays, rows stored one after the other)."""
    acc = 0.0
    for i in range(n):
        acc += a[oa + i] * b[ob + i]
    return acc


def _axpy(y, a, x, ox, n):
    """y[:n] += a * x[ox:ox + n]."""
    for i in range(n):
        y[i] += a * x[ox + i]


def _forward(L, M, active, q, p, m, n, l):
    """l = L^-1 M[A, p] (L: the Cholesky factor of M_AA, row-major in an n x n block); returns
    M_pp - l'l, the squared distance of constraint p from the span of the active ones (in H^-1's
    metric): the curvature of the step towards p, 0 if p depends on them."""
    for i in range(q):
        acc = M[active[i] * m + p]
        for j in range(i):
            acc -= L[i * n + j] * l[j]
        l[i] = acc / L[i * n + i]
    return M[p * m + p] - _dot(l, 0, l, 0, q)


def _backward(L, l, q, n, r):
    """r = L^-T l, column-oriented: each solved entry updates the others through a row of L."""
    for i in range(q):
        r[i] = l[i]
    for i in range(q - 1, -1, -1):
        ri = r[i] / L[i * n + i]
        r[i] = ri
        for j in range(i):
            r[j] -= L[i * n + j] * ri


def _drop(L, u, active, flag, k, q, n):
    """Remove the k-th of ``q`` active constraints: delete its row of L, then rotate pairs of
    columns to make L triangular again (L L' is still M_AA).  ``u`` has q + 1 entries."""
    flag[active[k]] = 0
    for j in range(k, q - 1):
        active[j] = active[j + 1]
        u[j] = u[j + 1]
        for i in range(j + 2):
            L[j * n + i] = L[(j + 1) * n + i]
    u[q - 1] = u[q]
    for j in range(k, q - 1):
        a = L[j * n + j]
        b = L[j * n + j + 1]
        h = math.sqrt(a * a + b * b)
        c = a / h
        s = b / h
        L[j * n + j] = h
        L[j * n + j + 1] = 0.0
        for i in range(j + 1, q - 1):
            la = L[i * n + j]
            lb = L[i * n + j + 1]
            L[i * n + j] = c * la + s * lb
            L[i * n + j + 1] = -s * la + c * lb


def _multipliers(L, b, active, q, n, l, u):
    """u_A = -M_AA^-1 b_A (the multipliers that make the active constraints tight)."""
    for i in range(q):
        acc = -b[active[i]]
        for j in range(i):
            acc -= L[i * n + j] * l[j]
        l[i] = acc / L[i * n + i]
    _backward(L, l, q, n, u)


def _primal(x0, K, active, u, q, n, x):
    """x = x0 + K_A' u_A."""
    for i in range(n):
        x[i] = x0[i]
    for j in range(q):
        _axpy(x, u[j], K, active[j] * n, n)


def gi_solve(y, P, C, K, M, x, wf, wi, max_iter, tol):
    """Solve one voxel's problem into ``x``; returns the number of steps taken, or -1 (iteration
    limit) or -2 (no step possible: infeasible constraints).

    ``y`` (nv,) signal; ``P`` (n * nv,) the rows of H^-1 X'; ``C`` and ``K`` (m * n,) the rows of
    C (unit normals) and of C H^-1; ``M`` (m * m,) C H^-1 C'; ``wf``/``wi``: scratch of
    :func:`work_sizes`.  Warm start: on entry ``wi[n + m]`` constraints listed in ``wi[:n]`` (the
    active set of a neighbouring voxel) are tried as the initial active set; on return ``wi[:n]``
    and ``wi[n + m]`` hold this voxel's active set.  A good guess saves steps; the solution does
    not depend on it (the problem has a unique minimum).
    """
    n = x.shape[0]
    m = C.shape[0] // n
    nv = y.shape[0]
    L = wf[0:n * n]                       # Cholesky factor of M_AA, L[i, j] = L[i * n + j], j <= i
    x0 = wf[n * n:n * n + n]
    u = wf[n * n + n:n * n + 2 * n + 1]   # multipliers of the active set, then of p
    r = wf[n * n + 2 * n + 1:n * n + 3 * n + 1]
    l = wf[n * n + 3 * n + 1:n * n + 4 * n + 1]
    b = wf[n * n + 4 * n + 1:n * n + 4 * n + 1 + m]           # C x0
    s = wf[n * n + 4 * n + 1 + m:n * n + 4 * n + 1 + 2 * m]   # C x
    active = wi[0:n]
    flag = wi[n:n + m]
    n_init = wi[n + m]
    for k in range(m):
        flag[k] = 0
    for i in range(n):
        x0[i] = _dot(P, i * nv, y, 0, nv)
    for k in range(m):
        b[k] = _dot(C, k * n, x0, 0, n)
    scale = math.sqrt(_dot(x0, 0, x0, 0, n)) + 1.0
    # warm start: factorise the guessed active set (leaving out dependent constraints), then drop
    # the constraint of most negative multiplier until all are >= 0: a valid starting point
    q = 0
    for t in range(n_init):
        k = active[t]
        d = _forward(L, M, active, q, k, m, n, l)
        if d <= 1e-10 * M[k * m + k]:
            continue
        for j in range(q):
            L[q * n + j] = l[j]
        L[q * n + q] = math.sqrt(d)
        active[q] = k
        flag[k] = 1
        q += 1
    while q > 0:
        _multipliers(L, b, active, q, n, l, u)
        k_neg = -1
        most = 0.0
        for j in range(q):
            if u[j] < most:
                most = u[j]
                k_neg = j
        if k_neg < 0:
            break
        u[q] = 0.0
        _drop(L, u, active, flag, k_neg, q, n)
        q -= 1
    it = 0
    while True:
        # step 1: the most violated constraint, from C x = C x0 + M_{:,A} u_A
        for k in range(m):
            s[k] = b[k]
        for j in range(q):
            _axpy(s, u[j], M, active[j] * m, m)
        for j in range(q):
            s[active[j]] = 0.0                            # tight by construction
        p = -1
        worst = -tol * scale
        for k in range(m):
            if s[k] < worst:
                worst = s[k]
                p = k
        if p < 0:
            # none in the constraints' space: refine the active ones to tightness, then check
            # every constraint on x itself (rounding in M must not hide a violation)
            _primal(x0, K, active, u, q, n, x)
            for j in range(q):
                b[active[j]] = _dot(C, active[j] * n, x, 0, n)   # residuals (b is done with)
            if q > 0:
                _multipliers(L, b, active, q, n, l, r)
                for j in range(q):
                    if u[j] + r[j] > 0.0:
                        u[j] += r[j]
                _primal(x0, K, active, u, q, n, x)
            xs = math.sqrt(_dot(x, 0, x, 0, n)) + 1.0
            worst = -tol * xs
            for k in range(m):
                sk = _dot(C, k * n, x, 0, n)
                if sk < worst and flag[k] == 0:
                    worst = sk
                    p = k
            if p < 0:
                wi[n + m] = q
                return it
            for k in range(m):                           # b = C x0 again, to go on
                b[k] = _dot(C, k * n, x0, 0, n)
            s[p] = worst
        # step 2: move towards satisfying constraint p
        u[q] = 0.0
        sp = s[p]
        mpp = M[p * m + p]
        while True:
            it += 1
            if it > max_iter:
                wi[n + m] = 0
                return -1
            zn = _forward(L, M, active, q, p, m, n, l)    # l = L^-1 M_Ap
            _backward(L, l, q, n, r)                       # r = M_AA^-1 M_Ap
            # partial step: the first active multiplier to reach zero
            t1 = math.inf
            k_drop = -1
            for j in range(q):
                if r[j] > 0.0:
                    tj = u[j] / r[j]
                    if tj < t1:
                        t1 = tj
                        k_drop = j
            # full step: constraint p satisfied
            t2 = math.inf
            if zn > 1e-10 * mpp:
                t2 = -sp / zn
            if t1 == math.inf and t2 == math.inf:
                wi[n + m] = 0
                return -2
            t = t1 if t1 < t2 else t2
            for j in range(q):
                u[j] -= t * r[j]
            u[q] += t
            if t2 < math.inf:
                sp += t * zn
            if t == t2:
                for j in range(q):
                    L[q * n + j] = l[j]
                L[q * n + q] = math.sqrt(zn)
                active[q] = p
                flag[p] = 1
                q += 1
                break
            _drop(L, u, active, flag, k_drop, q, n)
            q -= 1


def solve_voxel(y, P, C, K, M, x, wf, wi, max_iter, tol):
    """:func:`gi_solve` warm-started; if that hits the iteration limit (rounding can make a
    degenerate path cycle), again from scratch.  Returns the steps of both, or a negative code."""
    steps = gi_solve(y, P, C, K, M, x, wf, wi, max_iter, tol)
    if steps != -1:
        return steps
    n = x.shape[0]
    wi[n + C.shape[0] // n] = 0
    steps = gi_solve(y, P, C, K, M, x, wf, wi, max_iter, tol)
    return steps + max_iter if steps >= 0 else steps


def solve_cpu(Y, P, C, K, M, X, steps, run, nf, ni, max_iter, tol):
    N = Y.shape[0]
    n_runs = (N + run - 1) // run
    for b in prange(n_runs):
        wf = np.empty(nf, np.float64)
        wi = np.empty(ni, np.int64)
        wi[ni - 1] = 0
        y = np.empty(Y.shape[1], np.float64)
        for v in range(b * run, min(N, (b + 1) * run)):
            for k in range(Y.shape[1]):
                y[k] = Y[v, k]
            steps[v] = solve_voxel(y, P, C, K, M, X[v], wf, wi, max_iter, tol)


def solve_gpu(Y, P, C, K, M, X, steps, run, WF, WI, max_iter, tol):
    b = cuda.grid(1)
    N = Y.shape[0]
    if b * run < N:
        wf = WF[b]
        wi = WI[b]
        wi[wi.shape[0] - 1] = 0
        for v in range(b * run, min(N, (b + 1) * run)):
            steps[v] = solve_voxel(Y[v], P, C, K, M, X[v], wf, wi, max_iter, tol)


_KERNELS: dict = {}
_LOCK = threading.Lock()
_DEVICE = (_dot, _axpy, _forward, _backward, _drop, _multipliers, _primal, gi_solve, solve_voxel)
# reassociation lets LLVM vectorise the dot products and the O(m q) search
_CPU_OPTIONS = {f.__name__: {"fastmath": {"reassoc", "contract"}} for f in _DEVICE}


def _kernel(target: str):
    with _LOCK:
        if target not in _KERNELS:
            driver = solve_cpu if target == "cpu" else solve_gpu
            fns = compile_for(target, device=_DEVICE, kernels=(driver,), options=_CPU_OPTIONS)
            _KERNELS[target] = fns[driver.__name__]
        return _KERNELS[target]


def _status(steps: np.ndarray) -> np.ndarray:
    status = np.full(steps.shape, OK, np.int8)
    status[steps == -1] = NOT_CONVERGED
    status[steps == -2] = INFEASIBLE
    return status


class ConstrainedLeastSquares:
    """``min |X x - y|^2  s.t.  C' x >= 0`` for many ``y`` sharing ``X`` (nv, n) and ``C`` (n, m).

    ``solve(Y)`` takes (N, nv) signals and returns ((N, n) solutions, (N,) status codes), and with
    ``steps=True`` also the (N,) number of active-set steps each voxel took.  Consecutive rows are
    warm-started from one another (``warm=False``: each from scratch): give them in spatial order,
    neighbours have similar active sets.
    """

    def __init__(self, X: np.ndarray, C: np.ndarray, *, max_iter: int | None = None,
                 tol: float = 1e-10):
        X = np.asarray(X, dtype=np.float64)
        C = np.asarray(C, dtype=np.float64)
        if C.shape[0] != X.shape[1]:
            raise ValueError(f"C has {C.shape[0]} rows, X {X.shape[1]} columns")
        norms = np.linalg.norm(C, axis=0)
        if np.any(norms == 0):
            raise ValueError("C has a zero column (an empty constraint)")
        Cn = (C / norms).T                                 # (m, n) unit normals
        H = X.T @ X
        Lh = np.linalg.cholesky(H)                         # fails if X has dependent columns
        Linv = np.linalg.solve(Lh, np.eye(len(H)))         # H^-1 = Linv' Linv
        W = Linv @ Cn.T                                    # (n, m)
        self.P = np.ascontiguousarray(Linv.T @ (Linv @ X.T)).ravel()
        self.C = np.ascontiguousarray(Cn).ravel()
        self.K = np.ascontiguousarray((Linv.T @ W).T).ravel()
        self.M = np.ascontiguousarray(W.T @ W).ravel()     # symmetric positive semi-definite
        self.n, self.m = C.shape
        self.max_iter = int(max_iter or 4 * (self.n + self.m))
        self.tol = float(tol)

    def _args(self):
        return self.P, self.C, self.K, self.M

    def solve(self, Y: np.ndarray, device: str = "cpu", chunk: int = 65536,
              steps: bool = False, warm: bool = True):
        Y = np.ascontiguousarray(Y)
        N = Y.shape[0]
        X = np.zeros((N, self.n), np.float64)
        n_steps = np.zeros(N, np.int32)
        nf, ni = work_sizes(self.n, self.m)
        if N and device == "cpu":
            import numba
            # a few long runs per thread: only the first voxel of a run starts cold
            run = max(RUN_GPU, -(-N // (4 * numba.get_num_threads()))) if warm else 1
            _kernel("cpu")(Y, *self._args(), X, n_steps, run, nf, ni, self.max_iter, self.tol)
        elif N:
            self._solve_cuda(Y, X, n_steps, chunk, nf, ni, RUN_GPU if warm else 1)
        status = _status(n_steps)
        return (X, status, n_steps) if steps else (X, status)

    def _solve_cuda(self, Y, X, n_steps, chunk, nf, ni, run):
        from numba import cuda as nbcuda
        kern = _kernel("cuda")
        consts = [nbcuda.to_device(a) for a in self._args()]
        threads = 64
        N = Y.shape[0]
        chunk = max(run, chunk - chunk % run)
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            dY = nbcuda.to_device(np.ascontiguousarray(Y[a:b], dtype=np.float64))
            dX = nbcuda.device_array((b - a, self.n), np.float64)
            ds = nbcuda.device_array(b - a, np.int32)
            runs = (b - a + run - 1) // run
            WF = nbcuda.device_array((runs, nf), np.float64)
            WI = nbcuda.device_array((runs, ni), np.int64)
            kern[(runs + threads - 1) // threads, threads](dY, *consts, dX, ds, run, WF, WI,
                                                           self.max_iter, self.tol)
            X[a:b] = dX.copy_to_host()
            n_steps[a:b] = ds.copy_to_host()
