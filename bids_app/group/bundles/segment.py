"""Label transfer from an atlas to a subject's fibres: optimal transport or nearest centroid.

Both take the subject's streamlines already mapped into the atlas space.  Label
``-1`` is the outlier class.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ...config import SEG_METHODS
from .atlas import Atlas
from .fibres import N_POINTS, arc_lengths, as_sequence, resample, to_vectors
from .ot import OTParams, transport_labels

log = logging.getLogger(__name__)

METHODS = SEG_METHODS


@dataclass
class Segmentation:
    """One label per input streamline (index into ``names``, -1 = outlier)."""

    names: list
    labels: np.ndarray
    score: np.ndarray                      # OT: transported mass fraction; centroid: distance (mm)
    method: str
    stats: dict = field(default_factory=dict)

    def counts(self) -> dict:
        c = np.bincount(self.labels[self.labels >= 0], minlength=len(self.names))
        out = {n: int(c[k]) for k, n in enumerate(self.names)}
        out["outlier"] = int(np.sum(self.labels < 0))
        return out

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.labels == self.names.index(name))


def segment(streamlines, atlas: Atlas, method: str = "ot", params: OTParams | None = None,
            backend=None, centroid_threshold: float | None = None,
            points: np.ndarray | None = None) -> Segmentation:
    """Label ``streamlines`` (list/ArraySequence of (k, 3) mm, in atlas space) with ``atlas``.

    ``points``: the streamlines already resampled to ``atlas.npts`` points, when the caller has them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}: choose one of {METHODS}")
    sl = as_sequence(streamlines)
    n = len(sl)
    labels = np.full(n, -1, np.int64)
    score = np.zeros(n)
    ok = np.flatnonzero(arc_lengths(sl) > 0) if n else np.zeros(0, np.int64)
    t0 = time.perf_counter()
    if not len(ok):
        X = np.zeros((0, 3 * atlas.npts))
    else:
        X = to_vectors(points[ok] if points is not None else resample(sl[ok], atlas.npts))
    if method == "ot":
        res = transport_labels(X, atlas.window_vectors(), atlas.labels, len(atlas.names), params, backend)
        labels[ok] = res.labels
        top = res.class_mass.max(axis=1) if res.class_mass.size else np.zeros(len(ok))
        score[ok] = top
        stats = dict(res.stats)
    else:
        lab, dist = centroid_labels(X, atlas, threshold=centroid_threshold, backend=backend)
        labels[ok] = lab
        score[ok] = dist
        stats = {}
    stats["seconds_total"] = time.perf_counter() - t0
    seg = Segmentation(list(atlas.names), labels, score, method, stats)
    log.info("%s segmentation of %d streamlines: %s", method, n, seg.counts())
    return seg


def centroid_labels(X: np.ndarray, atlas: Atlas, threshold: float | None = None,
                    backend=None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-centroid baseline: the bundle whose mean fibre is closest (RMS mm, either
    orientation).  A fibre farther than the bundle's threshold is an outlier; the default
    threshold per bundle is 1.5 x the 95th percentile of its own atlas fibres' distances."""
    from kernels.sinkhorn import get_backend

    backend = backend or get_backend("cpu")
    cent = to_vectors(atlas.centroids())
    present = np.flatnonzero(np.isfinite(cent).all(axis=1))
    if len(X) == 0 or len(present) == 0:
        return np.full(len(X), -1, np.int64), np.full(len(X), np.inf)
    cent = cent[present]
    if threshold is None:
        thr = np.empty(len(present))
        av = atlas.vectors()
        for k, c in enumerate(present):
            own = av[atlas.labels == c]
            d = _rms_to(own, cent[k])
            thr[k] = 1.5 * np.quantile(d, 0.95) if len(d) else 0.0
    else:
        thr = np.full(len(present), float(threshold))
    arg, cost = _nearest(backend, X, cent)
    dist = np.sqrt(2.0 * np.maximum(cost, 0.0))
    lab = present[arg]
    lab = np.where(dist <= thr[arg], lab, -1)
    return lab.astype(np.int64), dist


def _rms_to(V, c):
    from .fibres import flip
    d0 = np.linalg.norm(V - c[None], axis=1)
    d1 = np.linalg.norm(flip(V) - c[None], axis=1)
    return np.minimum(d0, d1)


def _nearest(backend, X, Y):
    """Closest fibre of Y (m, d) or windowed Y (m, w, d) for every fibre of X, and its cost."""
    npts = X.shape[1] // 3
    yw = Y.shape[1] if Y.ndim == 3 else 1
    to = backend.to_device
    return backend.nearest(backend.fibres(X), 1, backend.fibres(Y), yw, npts,
                           to(np.zeros(len(X), np.int64)), to(np.array([0, 1], np.int64)),
                           to(np.array([0], np.int64)), to(np.array([0, Y.shape[0]], np.int64)))


__all__ = ["METHODS", "Segmentation", "centroid_labels", "segment", "N_POINTS"]
