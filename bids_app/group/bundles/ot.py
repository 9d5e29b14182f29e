"""Unbalanced entropic optimal transport between two fibre sets (log-domain Sinkhorn).

Measures: ``alpha = sum_i a_i delta_{x_i}`` (subject fibres) and ``beta = sum_j b_j
delta_{y_j}`` (atlas fibres), each fibre also present reversed (see
:mod:`kernels.sinkhorn`).  Cost ``C = |x - y|^2 / 2`` on the vectors of
:mod:`.fibres` (mm), temperature ``eps`` annealed from the data diameter^2
down to ``blur^2`` by factors ``scaling^2``; marginal constraints relaxed by a
KL penalty of strength ``rho = reach^2`` (``reach=None``: balanced).  With
potentials ``f, g`` the plan is ``pi_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.

Multiscale: K-means clusters on both sides (atlas clusters never mix labels)
solve a dense problem between centroids until ``eps`` reaches the clusters' own
spread; the potentials are then extrapolated to the fibres, and from there on
only the cluster blocks that can carry mass (by the coarse plan, with a bound
from the cluster radii) are evaluated.  Memory stays linear in the number of
fibres: costs are recomputed on the fly by the kernels.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

LOG2 = math.log(2.0)


@dataclass
class OTParams:
    """Parameters of the label transfer (lengths in mm)."""

    blur: float = 3.0            # final entropic blur: sqrt(eps) at the last iteration
    reach: float | None = 20.0   # beyond this scale mass may be created/destroyed (None: balanced)
    scaling: float = 0.9         # eps annealing: blur shrinks by this factor per iteration
    outlier_level: float = 0.2   # outlier class: this fraction of a fibre's own (uniform) mass
    n_clusters: int | None = None  # subject clusters for the multiscale solver (None: automatic)
    truncate: float = 12.0       # keep cluster blocks within this many log-units of the best one
    dense_limit: int = 4_000_000  # rows x columns x windows under which no clusters are used
    final_iters: int = 3         # at most this many extra iterations at eps = blur^2 ...
    tol: float = 1e-2            # ... until potentials move less than tol * eps
    seed: int = 0

    def validate(self):
        if not self.blur > 0:
            raise ValueError("blur must be > 0")
        if self.reach is not None and not self.reach > 0:
            raise ValueError("reach must be > 0 (or None for balanced transport)")
        if not 0 < self.scaling < 1:
            raise ValueError("scaling must be in (0, 1)")
        if not self.outlier_level >= 0:
            raise ValueError("outlier_level must be >= 0")


@dataclass
class Blocks:
    """Rows/columns sorted by cluster and the CSR list of kept cluster pairs (both directions)."""

    row_start: np.ndarray   # (Kx+1,) rows of cluster I: row_start[I]:row_start[I+1]
    col_start: np.ndarray   # (Ky+1,)
    ptr: np.ndarray         # (Kx+1,) row cluster -> kept column clusters idx[ptr[I]:ptr[I+1]]
    idx: np.ndarray
    tptr: np.ndarray        # (Ky+1,) column cluster -> kept row clusters
    tidx: np.ndarray

    @property
    def row_cluster(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.row_start) - 1), np.diff(self.row_start))

    @property
    def col_cluster(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.col_start) - 1), np.diff(self.col_start))

    @property
    def n_pairs(self) -> int:
        """Number of (row, column) fibre pairs the kernels evaluate."""
        rows = np.diff(self.row_start)
        cols = np.diff(self.col_start)
        owner = np.repeat(np.arange(len(rows)), np.diff(self.ptr))
        return int(np.sum(rows[owner] * cols[self.idx]))

    @staticmethod
    def from_mask_pairs(row_start, col_start, pairs_i, pairs_j) -> "Blocks":
        kx, ky = len(row_start) - 1, len(col_start) - 1
        order = np.lexsort((pairs_j, pairs_i))
        pi, pj = pairs_i[order], pairs_j[order]
        ptr = np.concatenate([[0], np.cumsum(np.bincount(pi, minlength=kx))]).astype(np.int64)
        torder = np.lexsort((pi, pj))
        tptr = np.concatenate([[0], np.cumsum(np.bincount(pj, minlength=ky))]).astype(np.int64)
        return Blocks(np.asarray(row_start, np.int64), np.asarray(col_start, np.int64), ptr,
                      pj.astype(np.int64), tptr, pi[torder].astype(np.int64))

    @staticmethod
    def dense(row_start, col_start) -> "Blocks":
        kx, ky = len(row_start) - 1, len(col_start) - 1
        pi, pj = np.meshgrid(np.arange(kx), np.arange(ky), indexing="ij")
        return Blocks.from_mask_pairs(row_start, col_start, pi.ravel(), pj.ravel())


@dataclass
class TransportResult:
    """Potentials (in the caller's row/column order) and the per-class transported mass."""

    f: np.ndarray
    g: np.ndarray
    eps: float
    class_mass: np.ndarray          # (n_rows, n_classes): plan mass per class / a_i
    labels: np.ndarray              # (n_rows,) class index, -1 = outlier
    stats: dict = field(default_factory=dict)


def epsilon_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    """``diameter^2``, then ``blur^2`` shrinking by ``scaling^2`` per step, ending at ``blur^2``."""
    diameter = max(float(diameter), float(blur))
    n = int(math.floor(math.log(diameter / blur) / -math.log(scaling))) if diameter > blur else 0
    eps = [(diameter * scaling ** k) ** 2 for k in range(n + 1)]
    eps.append(blur ** 2)
    return eps


def dampening(eps: float, reach: float | None) -> float:
    """Factor of the unbalanced (KL) update: ``1 / (1 + eps / reach^2)`` (1 when balanced)."""
    return 1.0 if reach is None else 1.0 / (1.0 + eps / reach ** 2)


def diameter_of(*arrays: np.ndarray) -> float:
    """An upper bound of every distance between rows: the bounding-box diagonal."""
    lo = np.min([a.min(axis=0) for a in arrays if len(a)], axis=0)
    hi = np.max([a.max(axis=0) for a in arrays if len(a)], axis=0)
    return float(np.linalg.norm(hi - lo))


class _Problem:
    """Fibre arrays and a block structure on one backend; runs the two half-updates.

    ``X`` is (n, xw, d) and ``Y`` (m, yw, d): each fibre with its windows (see
    :func:`kernels.sinkhorn.pair_costs`); ``xw = yw = 1`` for plain fibres.
    """

    def __init__(self, backend, X, log_a, Y, log_b, blocks: Blocks, npts: int):
        X = _as3(X)
        Y = _as3(Y)
        self.be = backend
        self.npts = npts
        self.n, self.xw = X.shape[:2]
        self.m, self.yw = Y.shape[:2]
        self.X = backend.fibres(X)
        self.Y = backend.fibres(Y)
        self.log_a = np.asarray(log_a, np.float64) - LOG2   # each orientation carries half the mass
        self.log_b = np.asarray(log_b, np.float64) - LOG2
        self.blocks = blocks
        self.row_cluster = backend.to_device(blocks.row_cluster.astype(np.int64))
        self.col_cluster = backend.to_device(blocks.col_cluster.astype(np.int64))
        self.row_start = backend.to_device(blocks.row_start)
        self.col_start = backend.to_device(blocks.col_start)
        self.ptr = backend.to_device(blocks.ptr)
        self.idx = backend.to_device(blocks.idx)
        self.tptr = backend.to_device(blocks.tptr)
        self.tidx = backend.to_device(blocks.tidx)
        self.n_calls = 0

    def f_update(self, eps, lam, g):
        self.n_calls += 1
        return self.be.softmin(self.X, self.xw, self.Y, self.yw, self.log_b + g / eps, eps, lam, self.npts,
                               self.row_cluster, self.ptr, self.idx, self.col_start)

    def g_update(self, eps, lam, f):
        self.n_calls += 1
        return self.be.softmin(self.Y, self.yw, self.X, self.xw, self.log_a + f / eps, eps, lam, self.npts,
                               self.col_cluster, self.tptr, self.tidx, self.row_start)

    def anneal(self, eps_list, reach, f=None, g=None):
        """Symmetric (averaged) updates along ``eps_list``; starts from zero potentials if none given."""
        for eps in eps_list:
            lam = dampening(eps, reach)
            if f is None or g is None:
                f = self.f_update(eps, lam, np.zeros(self.m))
                g = self.g_update(eps, lam, np.zeros(self.n))
                continue
            ft = self.f_update(eps, lam, g)
            gt = self.g_update(eps, lam, f)
            f, g = 0.5 * (f + ft), 0.5 * (g + gt)
        return f, g

    def finish(self, eps, reach, f, g, max_iters: int, tol: float):
        """Alternating full updates at the final ``eps`` until the potentials settle."""
        lam = dampening(eps, reach)
        f = self.f_update(eps, lam, g)
        g = self.g_update(eps, lam, f)
        it = 0
        for it in range(1, max_iters + 1):
            f_new = self.f_update(eps, lam, g)
            g_new = self.g_update(eps, lam, f_new)
            delta = max(_maxabs(f_new - f), _maxabs(g_new - g))
            f, g = f_new, g_new
            if delta < tol * eps:
                break
        return f, g, it

    def class_mass(self, eps, f, g, col_class, n_classes):
        return self.be.class_mass(self.X, self.xw, self.Y, self.yw, self.log_b + g / eps, f, eps, self.npts,
                                  self.row_cluster, self.ptr, self.idx, self.col_start,
                                  self.be.to_device(np.asarray(col_class, np.int64)), n_classes)


def _as3(a):
    a = np.asarray(a, np.float64)
    return a[:, None, :] if a.ndim == 2 else a


def _maxabs(a):
    a = a[np.isfinite(a)]
    return float(np.max(np.abs(a))) if len(a) else 0.0


# --------------------------------------------------------------------------- clustering

def kmeans(V: np.ndarray, k: int, seed: int = 0, fit_max: int = 20000, n_iter: int = 25) -> np.ndarray:
    """Cluster index per fibre (0..k'-1, no empty cluster): K-means on a coarser description.

    Clusters only steer which blocks are evaluated (the truncation uses exact radii), so they
    are fitted cheaply: on 5 of the fibre's points (ends, quarters, middle), on at most
    ``fit_max`` random fibres, then every fibre goes to its nearest centre.
    """
    n = len(V)
    if k >= n:
        return np.arange(n)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import KMeans

    npts = V.shape[1] // 3
    keep = np.unique(np.round(np.linspace(0, npts - 1, min(5, npts))).astype(int))
    W = V.reshape(n, npts, 3)[:, keep].reshape(n, -1)
    rng = np.random.default_rng(seed)
    fit = W if n <= fit_max else W[rng.choice(n, fit_max, replace=False)]
    km = KMeans(n_clusters=min(k, len(fit)), n_init=1, max_iter=n_iter, random_state=seed).fit(fit)
    cent = km.cluster_centers_
    lab = np.empty(n, np.int64)
    cc = np.sum(cent ** 2, axis=1)
    for s in range(0, n, 8192):
        d = cc[None, :] - 2.0 * W[s:s + 8192] @ cent.T
        lab[s:s + 8192] = np.argmin(d, axis=1)
    _, lab = np.unique(lab, return_inverse=True)
    return lab.astype(np.int64)


def _sort_by_cluster(lab: np.ndarray):
    order = np.argsort(lab, kind="stable")
    counts = np.bincount(lab)
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return order, start


def _cluster_stats(V_sorted, start):
    """Per cluster and window: centroids (k, w, d); per cluster: radius (largest member distance
    to its centroid over the windows) and RMS spread.  ``V_sorted`` is (n, w, d)."""
    k = len(start) - 1
    owner = np.repeat(np.arange(k), np.diff(start))
    counts = np.diff(start).astype(np.float64)
    cent = np.zeros((k,) + V_sorted.shape[1:])
    np.add.at(cent, owner, V_sorted)
    cent /= counts[:, None, None]
    d2 = np.sum((V_sorted - cent[owner]) ** 2, axis=2)          # (n, w)
    rad = np.zeros(k)
    np.maximum.at(rad, owner, np.sqrt(d2.max(axis=1)))
    spread = np.sqrt(np.bincount(owner, weights=d2.mean(axis=1), minlength=k) / counts)
    return cent, rad, spread


def _min_orient_sqdist(A, B):
    """Squared distance between every row of A and every row of B, best orientation (dense)."""
    from .fibres import flip
    aa = np.sum(A * A, axis=1)[:, None]
    bb = np.sum(B * B, axis=1)[None, :]
    d0 = aa + bb - 2.0 * A @ B.T
    d1 = aa + bb - 2.0 * A @ flip(B).T
    return np.maximum(np.minimum(d0, d1), 0.0)


def _window_sqdist(A, B):
    """Squared distance between fibres of A (k, d) and windowed fibres of B (l, w, d): the best
    window and orientation."""
    out = None
    for w in range(B.shape[1]):
        d = _min_orient_sqdist(A, B[:, w])
        out = d if out is None else np.minimum(out, d)
    return out


def _truncate(cx, rx, fx, cy, ry, gy, eps, tau, chunk=512):
    """Cluster pairs that can carry mass: optimistic log-density within ``tau`` of the row's or
    the column's best actual one (coarse potentials at ``eps``).  ``cx`` (kx, d), ``cy`` (ky, w, d)."""
    kx, ky = len(cx), len(cy)
    row_best = np.full(kx, -np.inf)
    col_best = np.full(ky, -np.inf)
    sqdist = []   # kx x ky cluster distances in all: kept for the second pass
    for s in range(0, kx, chunk):
        d2 = _window_sqdist(cx[s:s + chunk], cy)
        sqdist.append(d2)
        act = (fx[s:s + chunk, None] + gy[None, :] - 0.5 * d2) / eps
        row_best[s:s + chunk] = act.max(axis=1)
        np.maximum(col_best, act.max(axis=0), out=col_best)
    pi, pj = [], []
    for s, d2 in zip(range(0, kx, chunk), sqdist):
        d = np.sqrt(d2)
        low = np.maximum(d - rx[s:s + chunk, None] - ry[None, :], 0.0)
        opt = (fx[s:s + chunk, None] + gy[None, :] - 0.5 * low ** 2) / eps
        keep = (opt >= row_best[s:s + chunk, None] - tau) | (opt >= col_best[None, :] - tau)
        i, j = np.nonzero(keep)
        pi.append(i + s)
        pj.append(j)
    return np.concatenate(pi), np.concatenate(pj)


# --------------------------------------------------------------------------- driver

def transport_labels(X: np.ndarray, Y: np.ndarray, y_labels: np.ndarray, n_labels: int,
                     params: OTParams | None = None, backend=None, a: np.ndarray | None = None,
                     b: np.ndarray | None = None) -> TransportResult:
    """Label each row of ``X`` with the class of the atlas fibres ``Y`` it sends its mass to.

    ``X`` (n, 3*npts) and ``Y`` (m, 3*npts) are fibre vectors (:func:`.fibres.to_vectors`);
    ``Y`` may also be (m, w, 3*npts): each atlas fibre with ``w`` windows (sub-fibres), the cost
    of a pair being the best window.  ``y_labels`` (m,) class indices in ``0..n_labels-1``.  A
    fibre whose mass sent to its best class is below ``params.outlier_level`` (fraction of its
    own mass) gets label -1.
    """
    from kernels.sinkhorn import get_backend

    params = params or OTParams()
    params.validate()
    backend = backend or get_backend("cpu")
    X = np.asarray(X, np.float64)
    Y = _as3(Y)
    y_labels = np.asarray(y_labels, np.int64)
    n, m = len(X), len(Y)
    if n == 0 or m == 0:
        return TransportResult(np.zeros(n), np.zeros(m), params.blur ** 2, np.zeros((n, n_labels)),
                               np.full(n, -1, np.int64), {"n_pairs": 0})
    if X.ndim != 2 or X.shape[1] != Y.shape[2] or X.shape[1] % 3:
        raise ValueError("subject and atlas fibres must have the same number of points")
    if len(y_labels) != m:
        raise ValueError("one label per atlas fibre expected")
    npts = X.shape[1] // 3
    a = np.full(n, 1.0 / n) if a is None else np.asarray(a, np.float64)
    b = np.full(m, 1.0 / m) if b is None else np.asarray(b, np.float64)
    t0 = time.perf_counter()
    diameter = diameter_of(X, Y.reshape(-1, Y.shape[2]))
    eps_list = epsilon_schedule(diameter, params.blur, params.scaling)

    if n * m * Y.shape[1] <= params.dense_limit:
        res = _solve_dense(X, a, Y, b, y_labels, n_labels, eps_list, params, backend, npts)
    else:
        res = _solve_multiscale(X, a, Y, b, y_labels, n_labels, eps_list, params, backend, npts)
    res.stats.update({"n_rows": n, "n_cols": m, "diameter": diameter, "n_eps": len(eps_list),
                      "seconds": time.perf_counter() - t0, "backend": backend.name,
                      "pair_fraction": res.stats["n_pairs"] / float(n * m)})
    log.info("OT: %d x %d fibres, %.1f%% of pairs evaluated, %d kernel calls, %.1f s (%s)",
             n, m, 100 * res.stats["pair_fraction"], res.stats.get("kernel_calls", 0),
             res.stats["seconds"], backend.name)
    return res


def _labels_from_mass(mass, level):
    best = np.argmax(mass, axis=1) if mass.shape[1] else np.zeros(len(mass), np.int64)
    top = mass[np.arange(len(mass)), best] if mass.shape[1] else np.zeros(len(mass))
    return np.where(top >= level, best, -1).astype(np.int64)


def _solve_dense(X, a, Y, b, y_labels, n_labels, eps_list, params, backend, npts):
    # rows: one cluster; columns: one cluster per label (so every column cluster has one class)
    corder = np.argsort(y_labels, kind="stable")
    present = np.unique(y_labels)
    col_start = np.searchsorted(y_labels[corder], np.append(present, present[-1] + 1)).astype(np.int64)
    row_start = np.array([0, len(X)], np.int64)
    blocks = Blocks.dense(row_start, col_start)
    prob = _Problem(backend, X, np.log(a), Y[corder], np.log(b[corder]), blocks, npts)
    f, g = prob.anneal(eps_list[:-1], params.reach)
    eps = eps_list[-1]
    f, g, it = prob.finish(eps, params.reach, f, g, params.final_iters, params.tol)
    mass = prob.class_mass(eps, f, g, present, n_labels)
    g_out = np.empty_like(g)
    g_out[corder] = g
    return TransportResult(f, g_out, eps, mass, _labels_from_mass(mass, params.outlier_level),
                           {"n_pairs": blocks.n_pairs, "kernel_calls": prob.n_calls,
                            "final_iters": it, "multiscale": False})


def _auto_clusters(n: int) -> int:
    return int(min(1000, max(8, round(n / 32))))


def _solve_multiscale(X, a, Y, b, y_labels, n_labels, eps_list, params, backend, npts):
    t0 = time.perf_counter()
    kx = params.n_clusters or _auto_clusters(len(X))
    lab_x = kmeans(X, kx, params.seed)
    # atlas: one K-means on the whole fibres (window 0), then split by label so that no cluster
    # mixes bundles; about as many clusters as on the subject side
    Yfull = Y[:, 0]
    raw = kmeans(Yfull, kx, params.seed + 1)
    pair = raw * (int(y_labels.max()) + 1) + y_labels
    uniq, lab_y = np.unique(pair, return_inverse=True)
    lab_y = lab_y.astype(np.int64)
    col_class = list(uniq % (int(y_labels.max()) + 1))
    col_class = np.asarray(col_class, np.int64)
    t_cluster = time.perf_counter() - t0

    xorder, row_start = _sort_by_cluster(lab_x)
    yorder, col_start = _sort_by_cluster(lab_y)
    Xs, Ys, as_, bs = X[xorder], Y[yorder], a[xorder], b[yorder]
    cx, rx, sx = _cluster_stats(_as3(Xs), row_start)
    cx = cx[:, 0]
    cy, ry, sy = _cluster_stats(Ys, col_start)
    wa = np.add.reduceat(as_, row_start[:-1])
    wb = np.add.reduceat(bs, col_start[:-1])

    # coarse: dense problem between centroids while eps is above the clusters' spread
    spread = float(np.median(np.concatenate([sx, sy])))
    eps_jump = max(spread ** 2, eps_list[-1])
    coarse_eps = [e for e in eps_list[:-1] if e >= eps_jump] or [eps_list[0]]
    fine_eps = [e for e in eps_list[:-1] if e < coarse_eps[-1]]
    coarse = _Problem(backend, cx, np.log(wa), cy, np.log(wb),
                      Blocks.dense(np.array([0, len(cx)]), np.array([0, len(cy)])), npts)
    fc, gc = coarse.anneal(coarse_eps, params.reach)
    eps_j = coarse_eps[-1]

    # keep the cluster blocks that can carry mass
    pi, pj = _truncate(cx, rx, fc, cy, ry, gc, eps_j, params.truncate)
    blocks = Blocks.from_mask_pairs(row_start, col_start, pi, pj)

    # extrapolate the coarse potentials to the fibres (fine rows against coarse columns)
    lam = dampening(eps_j, params.reach)
    unit_x = np.arange(len(cx) + 1, dtype=np.int64)
    unit_y = np.arange(len(cy) + 1, dtype=np.int64)
    ext_f = _Problem(backend, Xs, np.log(as_), cy, np.log(wb),
                     Blocks(row_start, unit_y, blocks.ptr, blocks.idx, blocks.tptr, blocks.tidx), npts)
    f = ext_f.f_update(eps_j, lam, gc)
    ext_g = _Problem(backend, cx, np.log(wa), Ys, np.log(bs),
                     Blocks(unit_x, col_start, blocks.ptr, blocks.idx, blocks.tptr, blocks.tidx), npts)
    g = ext_g.g_update(eps_j, lam, fc)

    fine = _Problem(backend, Xs, np.log(as_), Ys, np.log(bs), blocks, npts)
    f, g = fine.anneal(fine_eps, params.reach, f, g)
    eps = eps_list[-1]
    f, g, it = fine.finish(eps, params.reach, f, g, params.final_iters, params.tol)
    mass_s = fine.class_mass(eps, f, g, col_class, n_labels)

    f_out = np.empty_like(f)
    f_out[xorder] = f
    g_out = np.empty_like(g)
    g_out[yorder] = g
    mass = np.empty_like(mass_s)
    mass[xorder] = mass_s
    return TransportResult(
        f_out, g_out, eps, mass, _labels_from_mass(mass, params.outlier_level),
        {"n_pairs": blocks.n_pairs, "multiscale": True, "clusters": (len(cx), len(cy)),
         "blocks": int(len(blocks.idx)), "eps_jump": eps_j, "final_iters": it,
         "kernel_calls": coarse.n_calls + 2 + fine.n_calls, "cluster_seconds": t_cluster})
