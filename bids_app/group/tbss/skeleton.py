"""Mean-FA skeleton, distance map and projection of subject maps onto the skeleton.

Our own implementation of the TBSS ideas (REFERENCE section 6, steps 4-5):

* perpendicular direction per voxel: from the intensity centre of gravity of the 3x3x3
  neighbourhood when it is clearly off-centre (the voxel sits on a tract's flank and the
  centre of gravity points across the tract, towards its core), otherwise the offset of
  strongest ridge curvature ``2 I(x) - I(x+o) - I(x-o)`` among the 13 half-neighbourhood
  offsets, weighted by ``|o|**-1.4``;
* the curvature-based directions are smoothed by a mode filter over the 3x3x3
  neighbourhood (the centre-of-gravity ones are kept: on tube-shaped tracts the mode of
  the neighbourhood would override a flank voxel's clear "towards the core" direction
  and leave a three-voxel-wide ribbon instead of a line);
* non-maximum suppression: a voxel is on the skeleton when it is a maximum along
  ``+-d`` and ``+-2d``;
* the distance map is the distance to the nearest skeleton voxel or non-brain voxel;
* projection: from each skeleton voxel walk along ``+-d`` (up to 30 voxels) while the
  distance map keeps increasing, weight candidates by a Gaussian of sigma 10 voxels and
  keep the subject's largest (weighted) FA; other maps take the value at that location.

Directions are stored as an index into :data:`OFFSETS` (-1: none).
"""
from __future__ import annotations

import numpy as np
from numba import njit
from scipy import ndimage as ndi

# The 13 offsets of a half 3x3x3 neighbourhood (first non-zero component positive).
OFFSETS = np.array([o for o in np.ndindex(3, 3, 3)], dtype=np.int64) - 1
OFFSETS = OFFSETS[[next((v > 0 for v in o if v != 0), False) for o in OFFSETS]]
assert len(OFFSETS) == 13

COG_THRESHOLD = 0.25      # voxels: centre of gravity "clearly off-centre"
CURVATURE_POWER = -1.4
SEARCH_VOXELS = 30.0
SEARCH_SIGMA = 10.0


@njit(cache=True)
def _perpendicular(img, mask, offs, cog_threshold, power):
    nx, ny, nz = img.shape
    out = np.full(img.shape, -1, np.int8)
    from_cog = np.zeros(img.shape, np.bool_)
    norms = np.empty(offs.shape[0])
    for o in range(offs.shape[0]):
        norms[o] = np.sqrt(offs[o, 0] ** 2 + offs[o, 1] ** 2 + offs[o, 2] ** 2)
    for x in range(1, nx - 1):
        for y in range(1, ny - 1):
            for z in range(1, nz - 1):
                if not mask[x, y, z] or img[x, y, z] <= 0:
                    continue
                tot = 0.0
                cx = 0.0
                cy = 0.0
                cz = 0.0
                for a in range(-1, 2):
                    for b in range(-1, 2):
                        for c in range(-1, 2):
                            v = img[x + a, y + b, z + c]
                            tot += v
                            cx += v * a
                            cy += v * b
                            cz += v * c
                best = -1
                if tot > 0:
                    cx /= tot
                    cy /= tot
                    cz /= tot
                    r = np.sqrt(cx * cx + cy * cy + cz * cz)
                    if r > cog_threshold:
                        bestdot = -1.0
                        for o in range(offs.shape[0]):
                            d = abs(cx * offs[o, 0] + cy * offs[o, 1] + cz * offs[o, 2]) / (r * norms[o])
                            if d > bestdot:
                                bestdot = d
                                best = o
                        from_cog[x, y, z] = True
                if best < 0:
                    bestscore = -np.inf
                    i0 = img[x, y, z]
                    for o in range(offs.shape[0]):
                        a, b, c = offs[o, 0], offs[o, 1], offs[o, 2]
                        s = (2 * i0 - img[x + a, y + b, z + c] - img[x - a, y - b, z - c]) * norms[o] ** power
                        if s > bestscore:
                            bestscore = s
                            best = o
                out[x, y, z] = best
    return out, from_cog


@njit(cache=True)
def _mode_filter(dirs, keep, n_dirs):
    nx, ny, nz = dirs.shape
    out = dirs.copy()
    counts = np.zeros(n_dirs, np.int64)
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                own = dirs[x, y, z]
                if own < 0 or keep[x, y, z]:
                    continue
                counts[:] = 0
                for a in range(max(x - 1, 0), min(x + 2, nx)):
                    for b in range(max(y - 1, 0), min(y + 2, ny)):
                        for c in range(max(z - 1, 0), min(z + 2, nz)):
                            d = dirs[a, b, c]
                            if d >= 0:
                                counts[d] += 1
                best = own
                for d in range(n_dirs):
                    if counts[d] > counts[best]:
                        best = d
                out[x, y, z] = best
    return out


@njit(cache=True)
def _value(img, x, y, z):
    nx, ny, nz = img.shape
    if 0 <= x < nx and 0 <= y < ny and 0 <= z < nz:
        return img[x, y, z]
    return 0.0


@njit(cache=True)
def _suppress(img, dirs, offs):
    nx, ny, nz = img.shape
    out = np.zeros(img.shape, np.bool_)
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                d = dirs[x, y, z]
                if d < 0:
                    continue
                a, b, c = offs[d, 0], offs[d, 1], offs[d, 2]
                v = img[x, y, z]
                if (v > _value(img, x + a, y + b, z + c) and v >= _value(img, x - a, y - b, z - c)
                        and v >= _value(img, x + 2 * a, y + 2 * b, z + 2 * c)
                        and v >= _value(img, x - 2 * a, y - 2 * b, z - 2 * c)):
                    out[x, y, z] = True
    return out


def skeletonise(mean_fa: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unthresholded skeleton (bool) and perpendicular directions (int8 index into OFFSETS)."""
    img = np.where(mask, np.asarray(mean_fa, np.float64), 0.0)
    dirs, from_cog = _perpendicular(img, np.asarray(mask, np.bool_), OFFSETS, COG_THRESHOLD, CURVATURE_POWER)
    dirs = _mode_filter(dirs, from_cog, len(OFFSETS))
    return _suppress(img, dirs, OFFSETS), dirs


def distance_map(skeleton: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Distance (voxels) to the nearest skeleton voxel or voxel outside ``mask``."""
    seeds = np.asarray(skeleton, bool) | ~np.asarray(mask, bool)
    if not seeds.any():
        return np.full(seeds.shape, np.inf)
    return ndi.distance_transform_edt(~seeds)


@njit(cache=True)
def _search(fa, dist, vox, dirs, offs, max_steps, sigma):
    n = vox.shape[0]
    nx, ny, nz = fa.shape
    values = np.empty(n, np.float64)
    where = np.empty(n, np.int64)
    for i in range(n):
        x, y, z = vox[i, 0], vox[i, 1], vox[i, 2]
        best = fa[x, y, z]
        bestw = best
        bx, by, bz = x, y, z
        d = dirs[x, y, z]
        if d >= 0:
            a, b, c = offs[d, 0], offs[d, 1], offs[d, 2]
            step = np.sqrt(a * a + b * b + c * c)
            for sign in (-1, 1):
                prev = dist[x, y, z]
                k = 1
                while k * step <= max_steps:
                    px, py, pz = x + sign * k * a, y + sign * k * b, z + sign * k * c
                    if not (0 <= px < nx and 0 <= py < ny and 0 <= pz < nz):
                        break
                    dd = dist[px, py, pz]
                    if dd <= prev:
                        break
                    prev = dd
                    r = k * step
                    w = fa[px, py, pz] * np.exp(-r * r / (2 * sigma * sigma))
                    if w > bestw:
                        bestw = w
                        best = fa[px, py, pz]
                        bx, by, bz = px, py, pz
                    k += 1
        values[i] = best
        where[i] = (bx * ny + by) * nz + bz
    return values, where


def project(fa: np.ndarray, skeleton_voxels: np.ndarray, dirs: np.ndarray, dist: np.ndarray,
            *, max_search: float = SEARCH_VOXELS, sigma: float = SEARCH_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Project one subject's FA (common space) onto the skeleton.

    Returns ``(values, flat_index)``: the FA given to each skeleton voxel (rows of
    ``skeleton_voxels``) and the C-order flat index of the voxel it came from, used
    to take MD/AD/RD at the same places (``md.ravel()[flat_index]``).
    """
    return _search(np.ascontiguousarray(fa, np.float64), np.ascontiguousarray(dist, np.float64),
                   np.ascontiguousarray(skeleton_voxels, np.int64), dirs, OFFSETS,
                   float(max_search), float(sigma))
