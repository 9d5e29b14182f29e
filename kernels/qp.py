"""Many small least-squares problems with linear inequality constraints, one per voxel, that share
their design matrix: multi-shell multi-tissue CSD (Jeurissen et al. 2014) and its kin.

For each voxel ``v``::

    minimise  0.5 x' H x - (X' y_v)' x     subject to   C' x >= 0          (H = X' X, shared)

solved exactly by the dual active-set method of Goldfarb & Idnani (1983): it starts at the
unconstrained minimum ``P y_v`` (``P = H^-1 X'``) and adds the most violated constraint, dropping
one whenever a multiplier would turn negative, until no constraint is violated.  The factorisation
of ``H`` is shared (``J0 = L^-T`` with ``H = L L'``), each voxel updates its own copy by Givens
rotations, so a voxel costs a few hundred microseconds on a CPU core whatever the number of
constraints that end active (a per-voxel general QP solver such as DIPY's cvxpy path costs 50-100
ms).

The algorithm is written once as device functions and compiled by :mod:`kernels.compile` for the
CPU (a ``prange`` driver) and for CUDA (one thread per voxel); each voxel's scratch is one row of
a work array, so the same code runs on both.
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


def work_sizes(n: int, m: int) -> tuple[int, int]:
    """Float and int scratch per voxel for ``n`` unknowns and ``m`` constraints."""
    return 2 * n * n + 6 * n + 2, n + m + 1


def _jt_column(J, C, k, d, n):
    """d = J' c_k (the constraint's normal in the current basis)."""
    for j in range(n):
        acc = 0.0
        for i in range(n):
            acc += J[i * n + j] * C[i, k]
        d[j] = acc


def _add_column(J, R, d, q, n):
    """Make constraint ``q`` active: rotate ``d = J' c`` so that d[q+1:] = 0 (the same rotations
    applied to the columns of J), then d[:q+1] is R's new column."""
    for j in range(n - 1, q, -1):
        a = d[j - 1]
        b = d[j]
        if b == 0.0:
            continue
        h = math.sqrt(a * a + b * b)
        c = a / h
        s = b / h
        d[j - 1] = h
        d[j] = 0.0
        for i in range(n):
            ja = J[i * n + j - 1]
            jb = J[i * n + j]
            J[i * n + j - 1] = c * ja + s * jb
            J[i * n + j] = -s * ja + c * jb
    for i in range(q + 1):
        R[i * n + q] = d[i]


def _drop_column(J, R, u, active, flag, k, q, n):
    """Remove active constraint ``k`` of ``q``: shift, then restore R's triangle by rotations
    of its rows (the same rotations applied to the columns of J).  ``u`` has q + 1 entries."""
    flag[active[k]] = 0
    for j in range(k, q - 1):
        active[j] = active[j + 1]
        u[j] = u[j + 1]
        for i in range(n):
            R[i * n + j] = R[i * n + j + 1]
    u[q - 1] = u[q]
    for i in range(n):
        R[i * n + q - 1] = 0.0
    for j in range(k, q - 1):
        a = R[j * n + j]
        b = R[(j + 1) * n + j]
        if b == 0.0:
            continue
        h = math.sqrt(a * a + b * b)
        c = a / h
        s = b / h
        for l in range(j, q - 1):
            ra = R[j * n + l]
            rb = R[(j + 1) * n + l]
            R[j * n + l] = c * ra + s * rb
            R[(j + 1) * n + l] = -s * ra + c * rb
        for i in range(n):
            ja = J[i * n + j]
            jb = J[i * n + j + 1]
            J[i * n + j] = c * ja + s * jb
            J[i * n + j + 1] = -s * ja + c * jb


def gi_solve(y, P, C, cinv, J0, x, wf, wi, max_iter, tol):
    """Solve one voxel's problem into ``x``; returns a status code (``OK``...).

    ``y`` (nv,) signal; ``P`` (n, nv); ``C`` (n, m) constraint columns and ``cinv`` (m,) the
    inverses of their norms; ``J0`` (n, n); ``wf``/``wi``: scratch of :func:`work_sizes`.
    Warm start: on entry ``wi[n + m]`` constraints listed in ``wi[:n]`` (the active set of a
    neighbouring voxel) are tried as the initial active set; on return ``wi[:n]`` and
    ``wi[n + m]`` hold this voxel's active set.  A good guess saves most of the iterations; the
    solution does not depend on it (the problem has a unique minimum).
    """
    n = J0.shape[0]
    m = C.shape[1]
    nv = y.shape[0]
    # scratch layout
    J = wf[0:n * n]                      # J[i, j] = J[i * n + j]; J' H J = I, J' N = [R; 0]
    R = wf[n * n:2 * n * n]              # upper triangular, R[i, j] = R[i * n + j]
    d = wf[2 * n * n:2 * n * n + n]
    z = wf[2 * n * n + n:2 * n * n + 2 * n]
    r = wf[2 * n * n + 2 * n:2 * n * n + 3 * n]
    u = wf[2 * n * n + 3 * n:2 * n * n + 4 * n + 1]     # multipliers of the active set, then of p
    x0 = wf[2 * n * n + 4 * n + 1:2 * n * n + 5 * n + 1]
    w = wf[2 * n * n + 5 * n + 1:2 * n * n + 6 * n + 1]
    active = wi[0:n]
    flag = wi[n:n + m]
    n_init = wi[n + m]
    for i in range(n):
        for j in range(n):
            J[i * n + j] = J0[i, j]
            R[i * n + j] = 0.0
    for k in range(m):
        flag[k] = 0
    # unconstrained minimum
    for i in range(n):
        acc = 0.0
        for k in range(nv):
            acc += P[i, k] * y[k]
        x0[i] = acc
        x[i] = acc
    # warm start: factorise the guessed active set, then drop constraints whose multiplier is
    # negative until the equality-constrained minimum is a valid starting point
    q = 0
    for t in range(n_init):
        k = active[t]
        _jt_column(J, C, k, d, n)
        tail = 0.0
        for j in range(q, n):
            tail += d[j] * d[j]
        if tail <= 1e-12 * (1.0 / (cinv[k] * cinv[k])):
            continue                                   # dependent on the ones already in
        _add_column(J, R, d, q, n)
        active[q] = k
        flag[k] = 1
        q += 1
    while q > 0:
        # u = -(R'R)^-1 N' x0, x = x0 + J[:, :q] v with R' v = -N' x0
        for j in range(q):
            acc = 0.0
            for i in range(n):
                acc += C[i, active[j]] * x0[i]
            w[j] = -acc
        for j in range(q):                             # R' v = w (forward)
            acc = w[j]
            for l in range(j):
                acc -= R[l * n + j] * r[l]
            r[j] = acc / R[j * n + j]
        for j in range(q - 1, -1, -1):                 # R u = v (back)
            acc = r[j]
            for l in range(j + 1, q):
                acc -= R[j * n + l] * u[l]
            u[j] = acc / R[j * n + j]
        k_neg = -1
        most = 0.0
        for j in range(q):
            if u[j] < most:
                most = u[j]
                k_neg = j
        if k_neg < 0:
            for i in range(n):
                acc = x0[i]
                for j in range(q):
                    acc += J[i * n + j] * r[j]
                x[i] = acc
            break
        u[q] = 0.0
        _drop_column(J, R, u, active, flag, k_neg, q, n)
        q -= 1
    xnorm = 0.0
    for i in range(n):
        xnorm += x[i] * x[i]
    it = 0
    while True:
        # step 1: the most violated constraint (scaled by its norm)
        p = -1
        worst = 0.0
        xn = math.sqrt(xnorm) + 1.0
        for k in range(m):
            if flag[k] != 0:
                continue
            s = 0.0
            for i in range(n):
                s += C[i, k] * x[i]
            s = s * cinv[k]
            if s < worst and -s > tol * xn:
                worst = s
                p = k
        if p < 0:
            wi[n + m] = q
            return OK
        u[q] = 0.0
        # step 2: move towards satisfying constraint p
        while True:
            it += 1
            if it > max_iter:
                wi[n + m] = 0
                return NOT_CONVERGED
            sp = 0.0
            for i in range(n):
                sp += C[i, p] * x[i]
            _jt_column(J, C, p, d, n)
            zn = 0.0
            for i in range(n):
                acc = 0.0
                for j in range(q, n):
                    acc += J[i * n + j] * d[j]
                z[i] = acc
                zn += acc * C[i, p]
            for j in range(q - 1, -1, -1):          # R r = d[:q]
                acc = d[j]
                for l in range(j + 1, q):
                    acc -= R[j * n + l] * r[l]
                r[j] = acc / R[j * n + j]
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
            if zn > 1e-14 * (1.0 + abs(sp)):
                t2 = -sp / zn
            if t1 == math.inf and t2 == math.inf:
                wi[n + m] = 0
                return INFEASIBLE
            if t2 == math.inf:
                t = t1                                 # dual step only
            else:
                t = t1 if t1 < t2 else t2
                xnorm = 0.0
                for i in range(n):
                    x[i] += t * z[i]
                    xnorm += x[i] * x[i]
            for j in range(q):
                u[j] -= t * r[j]
            u[q] += t
            if t2 < math.inf and t == t2:
                _add_column(J, R, d, q, n)
                active[q] = p
                flag[p] = 1
                q += 1
                break
            _drop_column(J, R, u, active, flag, k_drop, q, n)
            q -= 1


RUN = 32   # consecutive voxels solved by one thread, each warm-started from the previous one


def solve_cpu(Y, P, C, cinv, J0, X, status, nf, ni, max_iter, tol):
    N = Y.shape[0]
    n_runs = (N + RUN - 1) // RUN
    for b in prange(n_runs):
        wf = np.empty(nf, np.float64)
        wi = np.empty(ni, np.int64)
        wi[ni - 1] = 0
        y = np.empty(Y.shape[1], np.float64)
        for v in range(b * RUN, min(N, (b + 1) * RUN)):
            for k in range(Y.shape[1]):
                y[k] = Y[v, k]
            status[v] = gi_solve(y, P, C, cinv, J0, X[v], wf, wi, max_iter, tol)


def solve_gpu(Y, P, C, cinv, J0, X, status, WF, WI, max_iter, tol):
    b = cuda.grid(1)
    N = Y.shape[0]
    if b * RUN < N:
        wf = WF[b]
        wi = WI[b]
        wi[wi.shape[0] - 1] = 0
        for v in range(b * RUN, min(N, (b + 1) * RUN)):
            status[v] = gi_solve(Y[v], P, C, cinv, J0, X[v], wf, wi, max_iter, tol)


_KERNELS: dict = {}
_LOCK = threading.Lock()


def _kernel(target: str):
    with _LOCK:
        if target not in _KERNELS:
            fns = compile_for(target, device=(_jt_column, _add_column, _drop_column, gi_solve), kernels=(solve_cpu if target == "cpu" else solve_gpu,))
            _KERNELS[target] = fns["solve_cpu" if target == "cpu" else "solve_gpu"]
        return _KERNELS[target]


class ConstrainedLeastSquares:
    """``min |X x - y|^2  s.t.  C' x >= 0`` for many ``y`` sharing ``X`` (nv, n) and ``C`` (n, m).

    ``solve(Y)`` takes (N, nv) signals and returns ((N, n) solutions, (N,) status codes).
    """

    def __init__(self, X: np.ndarray, C: np.ndarray, *, max_iter: int | None = None,
                 tol: float = 1e-10):
        X = np.asarray(X, dtype=np.float64)
        C = np.asarray(C, dtype=np.float64)
        if C.shape[0] != X.shape[1]:
            raise ValueError(f"C has {C.shape[0]} rows, X {X.shape[1]} columns")
        H = X.T @ X
        L = np.linalg.cholesky(H)                      # fails if X has dependent columns
        Linv = np.linalg.solve(L, np.eye(len(H)))
        self.J0 = np.ascontiguousarray(Linv.T)         # J0 J0' = H^-1
        self.P = np.ascontiguousarray(self.J0 @ (self.J0.T @ X.T))
        self.C = np.ascontiguousarray(C)
        self.cinv = 1.0 / np.linalg.norm(self.C, axis=0)
        self.n, self.m = C.shape
        self.max_iter = int(max_iter or 4 * (self.n + self.m))
        self.tol = float(tol)

    def _args(self):
        return self.P, self.C, self.cinv, self.J0

    def solve(self, Y: np.ndarray, device: str = "cpu", chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        Y = np.ascontiguousarray(Y)
        N = Y.shape[0]
        X = np.zeros((N, self.n), np.float64)
        status = np.zeros(N, np.int8)
        nf, ni = work_sizes(self.n, self.m)
        if N == 0:
            return X, status
        if device == "cpu":
            _kernel("cpu")(Y, *self._args(), X, status, nf, ni, self.max_iter, self.tol)
            return X, status
        from numba import cuda as nbcuda
        kern = _kernel("cuda")
        consts = [nbcuda.to_device(np.ascontiguousarray(a)) for a in self._args()]
        threads = 64
        chunk -= chunk % RUN
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            dY = nbcuda.to_device(np.ascontiguousarray(Y[a:b], dtype=np.float64))
            dX = nbcuda.device_array((b - a, self.n), np.float64)
            ds = nbcuda.device_array(b - a, np.int8)
            runs = (b - a + RUN - 1) // RUN
            WF = nbcuda.device_array((runs, nf), np.float64)
            WI = nbcuda.device_array((runs, ni), np.int64)
            kern[(runs + threads - 1) // threads, threads](dY, *consts, dX, ds, WF, WI, self.max_iter, self.tol)
            X[a:b] = dX.copy_to_host()
            status[a:b] = ds.copy_to_host()
        return X, status
