"""Tract profiles: scalar maps sampled along each bundle (pyAFQ-style weighting).

Each streamline of a bundle is resampled to ``n_nodes`` points and oriented
consistently (the caller passes flip flags decided against the atlas bundle's
mean fibre, so node 0 is the same end for every subject).  At every node the
scalar is sampled trilinearly at each streamline's point; the profile value is
the weighted mean over streamlines, weights = 1 / Mahalanobis distance of the
point to the distribution of that node's points (uniform below
``MIN_STREAMLINES_FOR_WEIGHTS`` streamlines).
"""
from __future__ import annotations

import numpy as np

from ..transforms import sample_image
from .fibres import resample

N_NODES = 100
MIN_STREAMLINES_FOR_WEIGHTS = 15
MIN_MAHALANOBIS = 0.1   # floor so a streamline on the core cannot take all the weight


def oriented_nodes(streamlines, flips: np.ndarray | None = None, n_nodes: int = N_NODES) -> np.ndarray:
    """(n, n_nodes, 3) resampled streamlines, reversed where ``flips`` is True."""
    pts = resample(streamlines, n_nodes)
    if flips is not None and len(pts):
        flips = np.asarray(flips, bool)
        pts[flips] = pts[flips, ::-1]
    return pts


def mahalanobis_weights(nodes: np.ndarray) -> np.ndarray:
    """(n, n_nodes) weights, each column summing to 1."""
    n, k, _ = nodes.shape
    if n == 0:
        return np.zeros((0, k))
    if n < MIN_STREAMLINES_FOR_WEIGHTS:
        return np.full((n, k), 1.0 / n)
    w = np.empty((n, k))
    for j in range(k):
        p = nodes[:, j, :]
        mu = p.mean(axis=0)
        d = p - mu
        cov = d.T @ d / (n - 1)
        cov += np.eye(3) * (1e-6 * max(np.trace(cov), 1e-12))
        m2 = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
        w[:, j] = 1.0 / np.maximum(np.sqrt(np.maximum(m2, 0.0)), MIN_MAHALANOBIS)
    return w / w.sum(axis=0, keepdims=True)


def profile(nodes: np.ndarray, weights: np.ndarray, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Weighted mean of ``data`` (3D, world ``affine``) at the nodes; NaN where no point is inside."""
    if len(nodes) == 0:
        return np.full(nodes.shape[1], np.nan)
    vals = sample_image(np.asarray(data, np.float64), affine, nodes, order=1, cval=np.nan)  # (n, k)
    w = np.where(np.isfinite(vals), weights, 0.0)
    tot = w.sum(axis=0)
    num = np.nansum(np.where(np.isfinite(vals), vals, 0.0) * w, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, num / tot, np.nan)


def bundle_profiles(streamlines, flips, maps: dict, n_nodes: int = N_NODES) -> dict:
    """``{scalar: (n_nodes,) profile}`` for one bundle; ``maps`` is ``{scalar: (data, affine)}``."""
    nodes = oriented_nodes(streamlines, flips, n_nodes)
    weights = mahalanobis_weights(nodes)
    return {name: profile(nodes, weights, data, aff) for name, (data, aff) in maps.items()}
