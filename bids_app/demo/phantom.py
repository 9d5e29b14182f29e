"""The white-matter phantom in template space (RAS+ mm, origin at the brain centre).

Geometry is defined for the ``small`` size and scaled uniformly for ``full``; ``hcp`` is ``full``'s
phantom on an HCP-sized grid (145x174x145 at 1.25 mm) for memory and time benchmarks.  Each bundle is a
family of true fibre trajectories (about 1 mm apart across the bundle, a point every 0.5 mm);
voxel occupancy and local directions are derived from these trajectories elsewhere
(:mod:`bids_app.demo.simulate`), so crossings and fanning need no special cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Index in BUNDLES + 1 = label value.
BUNDLES: tuple[str, ...] = ("CC", "CST_L", "CST_R", "ARC_L", "OBL_R", "U_R", "FAN_L")

BUNDLE_DESCRIPTIONS = {
    "CC": "straight left-right commissural bundle (corpus-callosum-like)",
    "CST_L": "straight inferior-superior bundle, left; crosses CC at ~90 degrees",
    "CST_R": "straight inferior-superior bundle, right; crosses CC at ~90 degrees",
    "ARC_L": "curved anterior-posterior arc, left (arcuate-like); FA reduced in patients",
    "OBL_R": "straight oblique bundle, right, off all axes; crosses CST_R at ~60 degrees",
    "U_R": "U-shaped short association fibre under the cortex, right",
    "FAN_L": "fanning bundle, left: a narrow stem spreading out superiorly",
}

FIBRE_SPACING = 1.0   # mm between neighbouring trajectories
POINT_STEP = 0.5      # mm between points along a trajectory
OCCUPANCY_RADIUS = 1.0  # mm: a point belongs to a bundle within this distance of a trajectory

SIZES = ("small", "full", "hcp")

# OBL_R: 60 degrees from the vertical CST_R, with components along all three axes (so a sign
# error on any gradient axis changes its apparent direction).
OBL_DIRECTION = np.array([np.sin(np.radians(60)) * np.sin(np.radians(30)),
                          np.sin(np.radians(60)) * np.cos(np.radians(30)),
                          np.cos(np.radians(60))])


@dataclass(frozen=True)
class Geometry:
    """Template-space geometry and grid for one size."""

    size: str
    scale: float                    # uniform scale applied to the small-size design
    brain_axes: tuple               # semi-axes of the brain ellipsoid (mm)
    cortex_thickness: float         # mm, outer gray-matter shell
    ventricle_centre: tuple
    ventricle_axes: tuple
    grid_shape: tuple               # template (and default subject) grid
    zooms: tuple                    # voxel size (mm)
    subsample: int                  # sub-voxel samples per axis for partial volumes

    @property
    def inner_axes(self) -> np.ndarray:
        return np.asarray(self.brain_axes) - self.cortex_thickness

    def affine(self) -> np.ndarray:
        """RAS+ affine of the template grid, grid centre at the world origin."""
        return centred_affine(self.grid_shape, self.zooms)


def centred_affine(shape, zooms, rotation=None) -> np.ndarray:
    """Affine with voxel size ``zooms`` (columns may be negated for LAS etc. by the caller)
    whose grid centre maps to world (0, 0, 0); ``rotation`` (3x3) is applied in world."""
    m = np.diag(np.asarray(zooms, dtype=float))
    if rotation is not None:
        m = np.asarray(rotation, dtype=float) @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    centre = (np.asarray(shape[:3], dtype=float) - 1) / 2
    aff[:3, 3] = -m @ centre
    return aff


def geometry(size: str = "small") -> Geometry:
    if size == "small":
        s = 1.0
        return Geometry("small", s, (40.0, 50.0, 30.0), 5.0, (0.0, -6.0, 0.0), (5.0, 10.0, 6.0),
                        (40, 48, 32), (2.5, 2.5, 2.5), 3)
    if size in ("full", "hcp"):
        s = 1.85
        grid, zooms, sub = ((90, 108, 90), (2.0, 2.0, 2.0), 2) if size == "full" else \
            ((145, 174, 145), (1.25, 1.25, 1.25), 1)
        return Geometry(size, s, (40.0 * s, 50.0 * s, 30.0 * s), 5.0 * s, (0.0, -6.0 * s, 0.0),
                        (5.0 * s, 10.0 * s, 6.0 * s), grid, zooms, sub)
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")


# ---------------------------------------------------------------------------------------------
# tissue classes

BACKGROUND, CORTEX, INNER, CSF = 0, 1, 2, 3


def tissue_class(points: np.ndarray, geom: Geometry) -> np.ndarray:
    """Label template-space points: 0 background, 1 cortical GM shell, 2 inner brain, 3 CSF."""
    p = np.asarray(points, dtype=float)
    out = np.zeros(p.shape[0], dtype=np.uint8)
    r_out = np.sum((p / np.asarray(geom.brain_axes)) ** 2, axis=1)
    r_in = np.sum((p / geom.inner_axes) ** 2, axis=1)
    r_v = np.sum(((p - np.asarray(geom.ventricle_centre)) / np.asarray(geom.ventricle_axes)) ** 2,
                 axis=1)
    out[r_out <= 1] = CORTEX
    out[r_in <= 1] = INNER
    out[r_v <= 1] = CSF
    return out


# ---------------------------------------------------------------------------------------------
# trajectories

def _resample(curve: np.ndarray, step: float = POINT_STEP) -> np.ndarray:
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(np.ceil(s[-1] / step)) + 1, 2)
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, curve[:, k]) for k in range(3)], axis=1)


def _frames(curve: np.ndarray):
    """Tangents and a rotation-minimising (parallel-transported) normal/binormal along a curve."""
    tan = np.gradient(curve, axis=0)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    ref = np.array([1.0, 0.0, 0.0]) if abs(tan[0, 0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    n = ref - tan[0] * (ref @ tan[0])
    n /= np.linalg.norm(n)
    normals = np.empty_like(curve)
    for i in range(len(curve)):
        n = n - tan[i] * (n @ tan[i])
        n /= np.linalg.norm(n)
        normals[i] = n
    binormals = np.cross(tan, normals)
    return tan, normals, binormals


def _disc_offsets(radius: float, spacing: float = FIBRE_SPACING) -> np.ndarray:
    k = int(np.floor(radius / spacing))
    g = np.arange(-k, k + 1) * spacing
    a, b = np.meshgrid(g, g, indexing="ij")
    keep = a ** 2 + b ** 2 <= radius ** 2 + 1e-9
    return np.stack([a[keep], b[keep]], axis=1)


def _tube(centre: np.ndarray, radius: float) -> list[np.ndarray]:
    centre = _resample(centre, POINT_STEP / 2)
    _, n, b = _frames(centre)
    return [_resample(centre + oa * n + ob * b) for oa, ob in _disc_offsets(radius)]


def _line(p0, p1, n=200) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return np.asarray(p0, float) * (1 - t) + np.asarray(p1, float) * t


def _fan(stem_start, axis, spread_dir, length, stem_len, stem_radius, half_width):
    """Fibres leave a narrow elliptic stem along ``axis`` and spread along ``spread_dir``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    spread = np.asarray(spread_dir, float) / np.linalg.norm(spread_dir)
    thick = np.cross(axis, spread)
    gain = half_width / stem_radius
    n_a = int(np.ceil(2 * half_width / (1.1 * FIBRE_SPACING))) + 1   # ~1.1 mm apart at the end
    a_vals = np.linspace(-stem_radius, stem_radius, n_a)
    b_vals = np.arange(-np.floor(stem_radius), np.floor(stem_radius) + 1) * FIBRE_SPACING
    t = np.linspace(0.0, length, int(np.ceil(length / (POINT_STEP / 2))) + 1)
    u = np.clip((t - stem_len) / (length - stem_len), 0.0, 1.0)
    widen = 1.0 + (gain - 1.0) * (3 * u ** 2 - 2 * u ** 3)  # smoothstep: stem, then spread
    out = []
    for a in a_vals:
        for b in b_vals:
            if (a / stem_radius) ** 2 + (b / stem_radius) ** 2 > 1 + 1e-9:
                continue
            pts = (np.asarray(stem_start, float)[None] + t[:, None] * axis[None]
                   + (a * widen)[:, None] * spread[None] + b * thick[None])
            out.append(_resample(pts))
    return out


def _design_small() -> dict[str, list[np.ndarray]]:
    """Bundle trajectories for the small design (mm, template space)."""
    b = {}
    b["CC"] = _tube(_line((-23, 2, 11), (23, 2, 11)), 3.0)
    b["CST_L"] = _tube(_line((-12, 2, -17), (-12, 2, 19)), 3.0)
    b["CST_R"] = _tube(_line((12, 2, -17), (12, 2, 19)), 3.0)
    y = np.linspace(-23, 23, 300)
    arc = np.stack([np.full_like(y, -22.0), y, -7.0 + 8.0 * (1 - (y / 23.0) ** 2)], axis=1)
    b["ARC_L"] = _tube(arc, 2.6)
    d = OBL_DIRECTION
    c = np.array([12.0, 2.0, -6.0])
    b["OBL_R"] = _tube(_line(c - 21 * d, c + 21 * d), 2.6)
    th = np.linspace(np.pi, 2 * np.pi, 120)
    leg1 = _line((16, -28, 10), (16, -28, 5), 40)[:-1]
    bend = np.stack([np.full_like(th, 16.0), -22 + 6 * np.cos(th), 5 + 6 * np.sin(th)], axis=1)
    leg2 = _line((16, -16, 5), (16, -16, 10), 40)[1:]
    b["U_R"] = _tube(np.concatenate([leg1, bend, leg2]), 2.0)
    b["FAN_L"] = _fan((-10, 24, -12), (0, 0, 1), (0, 1, 0), length=22.0, stem_len=6.0,
                      stem_radius=2.0, half_width=10.0)
    return b


@lru_cache(maxsize=4)
def _trajectories_cached(size: str) -> tuple:
    geom = geometry("full" if size == "hcp" else size)
    if geom.scale == 1.0:
        design = _design_small()
    else:
        design = _design_scaled(geom.scale)
    return tuple((name, tuple(np.asarray(f, dtype=np.float64) for f in design[name]))
                 for name in BUNDLES)


def _design_scaled(s: float) -> dict[str, list[np.ndarray]]:
    """The small design with centrelines scaled by ``s``; tubes regenerated at 1 mm spacing."""
    small = _design_small()
    out = {}
    for name, fibres in small.items():
        if name == "FAN_L":
            out[name] = _fan(np.array([-10, 24, -12]) * s, (0, 0, 1), (0, 1, 0), length=22.0 * s,
                             stem_len=6.0 * s, stem_radius=2.0 * s, half_width=10.0 * s)
            continue
        radius = {"CC": 3.0, "CST_L": 3.0, "CST_R": 3.0, "ARC_L": 2.6, "OBL_R": 2.6,
                  "U_R": 2.0}[name]
        centre = np.mean(np.stack([_resample_n(f, 200) for f in fibres]), axis=0)
        out[name] = _tube(centre * s, radius * s)
    return out


def _resample_n(curve: np.ndarray, n: int) -> np.ndarray:
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, curve[:, k]) for k in range(3)], axis=1)


def template_trajectories(size: str = "small") -> dict[str, list[np.ndarray]]:
    """True fibre trajectories in template space: ``{bundle: [ (k, 3) arrays in mm ]}``."""
    return {name: [f.copy() for f in fibres] for name, fibres in _trajectories_cached(size)}
