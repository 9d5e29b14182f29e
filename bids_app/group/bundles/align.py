"""Label-free linear alignment of two tractograms (soft fibre correspondences).

Used when two fibre sets live in different spaces and no image registration is
at hand (DIPY's shipped bundles are each in their own subject's scanner space).
Coarse to fine over a blur ``sigma`` (mm): every fibre of either set is matched
softly to the fibres of the other (Gaussian weights of the weighted-RMS fibre
distance, best orientation, with a constant "no match" term so far fibres drop
out), then the transform minimising the squared distances between matched
points is solved in closed form: rigid, then similarity, then affine stages.
Starts from the translation that aligns the centres of mass.
"""
from __future__ import annotations

import logging

import numpy as np

from .fibres import N_POINTS, point_weights, resample, to_vectors

log = logging.getLogger(__name__)

DEFAULT_STAGES = (("rigid", 20.0), ("rigid", 14.0), ("similarity", 10.0), ("similarity", 7.0),
                  ("affine", 6.0), ("affine", 4.0))


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to (..., 3) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def _fit(src, dst, w, model):
    """Weighted closed-form fit ``dst ~ A @ src + t``; returns a 4x4 matrix."""
    w = w / w.sum()
    out = np.eye(4)
    if model == "affine":
        sh = np.hstack([src, np.ones((len(src), 1))])
        lhs = sh.T @ (sh * w[:, None])
        rhs = sh.T @ (dst * w[:, None])
        lhs += 1e-9 * np.trace(lhs) * np.eye(4)
        m = np.linalg.solve(lhs, rhs)
        out[:3, :3] = m[:3].T
        out[:3, 3] = m[3]
        return out
    mu_s = w @ src
    mu_d = w @ dst
    s0, d0 = src - mu_s, dst - mu_d
    cov = (d0 * w[:, None]).T @ s0
    u, sv, vt = np.linalg.svd(cov)
    fix = np.ones(3)
    fix[2] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag(fix) @ vt
    scale = 1.0
    if model == "similarity":
        var = float(w @ np.sum(s0 ** 2, axis=1))
        scale = float(np.sum(sv * fix) / var) if var > 0 else 1.0
    elif model != "rigid":
        raise ValueError(f"unknown model {model!r}")
    out[:3, :3] = scale * rot
    out[:3, 3] = mu_d - scale * rot @ mu_s
    return out


def _soft_targets(P, Q, sigma, outlier_sd=3.0):
    """For every fibre of P (n, k, 3): the soft-matched, oriented average of Q's fibres, and its
    total match weight in [0, 1]."""
    vp, vq = to_vectors(P), to_vectors(Q)
    vq_flip = to_vectors(Q[:, ::-1])
    pp = np.sum(vp * vp, axis=1)[:, None]
    qq = np.sum(vq * vq, axis=1)[None, :]
    d0 = np.maximum(pp + qq - 2 * vp @ vq.T, 0)
    d1 = np.maximum(pp + qq - 2 * vp @ vq_flip.T, 0)
    logk = -np.stack([d0, d1]) / (2 * sigma ** 2)             # (2, n, m)
    floor = -0.5 * outlier_sd ** 2                             # "no match" level
    top = np.maximum(logk.max(axis=(0, 2)), floor)
    k = np.exp(logk - top[None, :, None])
    z = k.sum(axis=(0, 2)) + np.exp(floor - top)
    k /= z[None, :, None]
    flat_q = Q.reshape(len(Q), -1)
    flat_qf = Q[:, ::-1].reshape(len(Q), -1)
    tgt = k[0] @ flat_q + k[1] @ flat_qf
    mass = k.sum(axis=(0, 2))
    tgt = tgt / np.maximum(mass, 1e-12)[:, None]
    return tgt.reshape(P.shape), mass


def register_tractograms(moving, static, *, stages=DEFAULT_STAGES, iters: int = 10,
                         max_fibres: int = 2000, npts: int = N_POINTS, seed: int = 0) -> np.ndarray:
    """4x4 affine mapping ``moving`` streamlines (list of (k, 3) mm) onto ``static`` ones."""
    rng = np.random.default_rng(seed)
    mov = resample(moving, npts)
    sta = resample(static, npts)
    if len(mov) == 0 or len(sta) == 0:
        raise ValueError("cannot align empty tractograms")
    if len(mov) > max_fibres:
        mov = mov[rng.choice(len(mov), max_fibres, replace=False)]
    if len(sta) > max_fibres:
        sta = sta[rng.choice(len(sta), max_fibres, replace=False)]
    pw = point_weights(npts) ** 2
    T = np.eye(4)
    T[:3, 3] = sta.reshape(-1, 3).mean(0) - mov.reshape(-1, 3).mean(0)
    for model, sigma in stages:
        for _ in range(iters):
            cur = apply_affine(T, mov)
            tgt_m, w_m = _soft_targets(cur, sta, sigma)        # moving fibre -> static average
            src_s, w_s = _soft_targets(sta, cur, sigma)        # static fibre -> moving average
            # the moving-side average is in current coordinates: take it back to the original
            src_s = apply_affine(np.linalg.inv(T), src_s)
            src = np.concatenate([mov.reshape(-1, 3), src_s.reshape(-1, 3)])
            dst = np.concatenate([tgt_m.reshape(-1, 3), sta.reshape(-1, 3)])
            w = np.concatenate([(w_m[:, None] * pw[None]).ravel(), (w_s[:, None] * pw[None]).ravel()])
            if w.sum() <= 0:
                break
            T_new = _fit(src, dst, w, model)
            step = np.abs(T_new - T).max()
            T = T_new
            if step < 1e-3:
                break
        log.debug("align %s sigma=%.1f: %s", model, sigma, np.round(T, 3).tolist())
    return T
