"""Fibres as fixed-length vectors: resampling, end-point weights, orientation.

A streamline resampled to ``npts`` points equally spaced along its length becomes
a vector of ``3 * npts`` numbers.  Point ``p`` is multiplied by
``sqrt(w_p / sum(w))`` (end points weight 2, others 1), so the Euclidean
distance between two vectors is the weighted RMS distance between matched
points, in mm.  Reversing a fibre (reading its points backwards) keeps the
weights, so flipped copies are compared with the same metric.
"""
from __future__ import annotations

import numpy as np
from dipy.tracking.streamline import set_number_of_points
from nibabel.streamlines import ArraySequence

N_POINTS = 20
ENDPOINT_WEIGHT = 2.0


def as_sequence(streamlines) -> ArraySequence:
    """An ``ArraySequence`` view/copy of a list of (k, 3) arrays (float32)."""
    if isinstance(streamlines, ArraySequence):
        return streamlines
    return ArraySequence([np.asarray(s, dtype=np.float32).reshape(-1, 3) for s in streamlines])


def valid_mask(streamlines) -> np.ndarray:
    """Streamlines that can be resampled: at least 2 points and a non-zero length."""
    return arc_lengths(streamlines) > 0


def arc_lengths(streamlines) -> np.ndarray:
    """Length (mm) of every streamline (0 for fewer than 2 points)."""
    sl = as_sequence(streamlines)
    n = len(sl)
    if n == 0:
        return np.zeros(0)
    lengths = np.asarray(sl._lengths, dtype=np.int64)
    offsets = np.asarray(sl._offsets, dtype=np.int64)
    if offsets[0] != 0 or np.any(offsets[1:] != np.cumsum(lengths)[:-1]):
        sl = sl.copy()  # a view with gaps: make the points contiguous
    data = np.asarray(sl.get_data(), dtype=np.float64)
    seg = np.linalg.norm(np.diff(data, axis=0), axis=1) if len(data) > 1 else np.zeros(0)
    # segment k joins point k and k+1; it belongs to streamline s when both are inside s
    owner = np.repeat(np.arange(n), lengths)
    same = owner[:-1] == owner[1:] if len(owner) > 1 else np.zeros(0, bool)
    out = np.zeros(n)
    np.add.at(out, owner[:-1][same], seg[same])
    out[lengths < 2] = 0.0
    return out


def resample(streamlines, npts: int = N_POINTS) -> np.ndarray:
    """(n, npts, 3) float64: each streamline resampled to ``npts`` points equally spaced along it."""
    sl = as_sequence(streamlines)
    if len(sl) == 0:
        return np.zeros((0, npts, 3))
    out = set_number_of_points(sl, npts)
    return np.asarray(out.get_data(), dtype=np.float64).reshape(len(sl), npts, 3)


def point_weights(npts: int = N_POINTS, endpoint_weight: float = ENDPOINT_WEIGHT) -> np.ndarray:
    """Scale factor per point: ``sqrt(w_p / sum(w))``."""
    w = np.ones(npts)
    w[0] = w[-1] = endpoint_weight
    return np.sqrt(w / w.sum())


def to_vectors(points: np.ndarray, endpoint_weight: float = ENDPOINT_WEIGHT) -> np.ndarray:
    """(n, npts, 3) resampled fibres -> (n, 3 * npts) float64 vectors (distance = weighted RMS mm)."""
    points = np.asarray(points, dtype=np.float64)
    n, npts, _ = points.shape
    return (points * point_weights(npts, endpoint_weight)[None, :, None]).reshape(n, 3 * npts)


def from_vectors(vectors: np.ndarray, endpoint_weight: float = ENDPOINT_WEIGHT) -> np.ndarray:
    """Inverse of :func:`to_vectors`."""
    vectors = np.asarray(vectors, dtype=np.float64)
    npts = vectors.shape[1] // 3
    return vectors.reshape(len(vectors), npts, 3) / point_weights(npts, endpoint_weight)[None, :, None]


def flip(vectors: np.ndarray) -> np.ndarray:
    """Every fibre read backwards (points in reverse order)."""
    n, d = vectors.shape
    return vectors.reshape(n, d // 3, 3)[:, ::-1, :].reshape(n, d)


def rms_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between matched rows of two vector arrays, the better of both orientations."""
    d0 = np.linalg.norm(a - b, axis=1)
    d1 = np.linalg.norm(a - flip(b), axis=1)
    return np.minimum(d0, d1)


def orient_to(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Boolean per fibre: True where it runs against ``reference`` ((npts, 3)) and should be flipped.

    ``points`` is (n, npts, 3) with the same ``npts`` as ``reference``.
    """
    d0 = np.sum((points - reference[None]) ** 2, axis=(1, 2))
    d1 = np.sum((points[:, ::-1] - reference[None]) ** 2, axis=(1, 2))
    return d1 < d0


def mean_fibre(points: np.ndarray, n_iter: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Consistently oriented mean of (n, npts, 3) fibres and the flip flags used.

    Starts from the fibre closest to the mean of the end points' midpoints and
    re-orients every fibre to the current mean a few times.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        raise ValueError("no fibres")
    mid = points.mean(axis=1)
    ref = points[np.argmin(np.linalg.norm(mid - mid.mean(0), axis=1))]
    flips = np.zeros(len(points), dtype=bool)
    for _ in range(n_iter):
        new = orient_to(points, ref)
        oriented = np.where(new[:, None, None], points[:, ::-1], points)
        ref = oriented.mean(axis=0)
        if np.array_equal(new, flips) and _ > 0:
            break
        flips = new
    return ref, flips
