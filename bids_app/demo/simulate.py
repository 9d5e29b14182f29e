"""Simulate one subject's diffusion data from the phantom, on any grid (shape, affine).

Pipeline: a random warp (affine + smooth analytic displacement) relates subject world mm to
template mm; the template trajectories are mapped into the subject; each voxel is sampled at
``subsample**3`` points which are classified (tissue in template space, bundle membership from the
nearest subject-space trajectory point); compartment fractions and mean fibre directions give a
multi-tensor signal evaluated with the gradient directions rotated from the voxel frame to world.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from ..gradients import fsl_to_voxel_bvecs, voxel_frame, voxel_to_fsl_bvecs  # noqa: F401
from . import phantom
from .phantom import BUNDLES, CORTEX, CSF, INNER

log = logging.getLogger(__name__)

# Diffusivities (mm^2/s) and relative S0 of the compartments.
LAMBDA_PAR = 1.7e-3
LAMBDA_PERP = 0.25e-3
PATIENT_BUNDLE = "ARC_L"
PATIENT_RD_FACTOR = 1.8          # patients: radial diffusivity x1.8 in PATIENT_BUNDLE
D_GM = 0.8e-3
D_CSF = 3.0e-3
ISO_FRACTION_WM = 0.1            # isotropic (GM-like) fraction inside bundle voxels
S0 = {"WM": 1000.0, "GM": 1150.0, "CSF": 2000.0}
T1W = {"WM": 1000.0, "GM": 650.0, "CSF": 250.0}


# ---------------------------------------------------------------------------------------------
# gradients

def _repel(n: int, seed: int, iters: int = 300) -> np.ndarray:
    """``n`` well-spread unit vectors on a hemisphere (antipodally symmetric repulsion)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    step = 0.05
    for _ in range(iters):
        pts = np.concatenate([v, -v])                      # charges and their antipodes
        diff = v[:, None, :] - pts[None, :, :]
        d2 = np.sum(diff ** 2, axis=2)
        d2[np.arange(n), np.arange(n)] = np.inf            # self
        force = np.sum(diff / d2[..., None] ** 1.5, axis=1)
        force -= v * np.sum(force * v, axis=1, keepdims=True)  # tangential part
        norm = np.linalg.norm(force, axis=1, keepdims=True)
        v = v + step * force / np.maximum(norm.max(), 1e-12)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        step *= 0.99
    v[v[:, 2] < 0] *= -1
    return v


@lru_cache(maxsize=16)
def _directions_cached(n: int, seed: int) -> np.ndarray:
    return _repel(n, seed)


def make_gradients(shells=(1000,), n_directions: int = 32, b0_every: int = 8, seed: int = 0):
    """bvals (N,) and voxel-frame bvecs (N, 3): first volume b0, one b0 per ``b0_every`` DW
    volumes, each shell ``n_directions`` spread unit vectors (a different set per shell)."""
    shells = [float(b) for b in shells]
    dw_b, dw_v = [], []
    for k, b in enumerate(shells):
        d = _directions_cached(int(n_directions), seed + 17 * k)
        dw_b += [b] * len(d)
        dw_v.append(d)
    dw_v = np.concatenate(dw_v)
    # interleave shells so every part of the scan samples all shells
    order = np.argsort(np.tile(np.arange(n_directions), len(shells)), kind="stable")
    dw_b, dw_v = np.asarray(dw_b)[order], dw_v[order]
    bvals, bvecs = [0.0], [np.zeros(3)]
    for i in range(len(dw_b)):
        if i > 0 and i % b0_every == 0:
            bvals.append(0.0)
            bvecs.append(np.zeros(3))
        bvals.append(dw_b[i])
        bvecs.append(dw_v[i])
    return np.asarray(bvals), np.asarray(bvecs)


# ---------------------------------------------------------------------------------------------
# subject <-> template warp

@dataclass
class Warp:
    """``to_template(x) = A @ (z + d(z))`` with ``z = P @ x`` (P: session head pose, rigid;
    A: subject affine; d: sum of low-frequency sinusoids, analytic, Lipschitz < 0.5)."""

    A: np.ndarray = field(default_factory=lambda: np.eye(4))
    P: np.ndarray = field(default_factory=lambda: np.eye(4))
    amps: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    phases: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def affine(self) -> np.ndarray:
        return self.A @ self.P

    def displacement(self, z: np.ndarray) -> np.ndarray:
        if len(self.amps) == 0:
            return np.zeros_like(z)
        arg = z @ self.waves.T + self.phases[None]
        return np.sin(arg) @ self.amps

    def to_template(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        z = _apply(self.P, x)
        return _apply(self.A, z + self.displacement(z))

    def from_template(self, y, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
        y = np.asarray(y, dtype=float)
        w = _apply(np.linalg.inv(self.A), y)
        z = w.copy()
        for _ in range(max_iter):
            z_new = w - self.displacement(z)
            done = np.max(np.abs(z_new - z)) < tol if len(z) else True
            z = z_new
            if done:
                break
        return _apply(np.linalg.inv(self.P), z)


def _apply(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ aff[:3, :3].T + aff[:3, 3]


def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_warp(seed: int, size: str = "small", session: int = 0) -> Warp:
    """The subject's warp (depends on ``seed``) and, for session > 0, a small extra head pose."""
    geom = phantom.geometry(size)
    rng = np.random.default_rng([int(seed), 7])
    A = np.eye(4)
    A[:3, :3] = _rotation(rng.uniform(-5, 5, 3)) @ np.diag(rng.uniform(0.95, 1.05, 3))
    A[:3, 3] = rng.uniform(-4, 4, 3) * np.array([1.0, 1.0, 0.75])
    k = 4
    lam = rng.uniform(60, 100, k) * geom.scale                # wavelengths (mm)
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    waves = dirs * (2 * np.pi / lam)[:, None]
    amp_dir = rng.normal(size=(k, 3))
    amp_dir /= np.linalg.norm(amp_dir, axis=1, keepdims=True)
    amps = amp_dir * rng.uniform(1.0, 2.0, k)[:, None] * geom.scale
    lip = np.sum(np.linalg.norm(amps, axis=1) * np.linalg.norm(waves, axis=1))
    if lip > 0.45:
        amps *= 0.45 / lip
    phases = rng.uniform(0, 2 * np.pi, k)
    P = np.eye(4)
    if session > 0:
        srng = np.random.default_rng([int(seed), 11, int(session)])
        P[:3, :3] = _rotation(srng.uniform(-2, 2, 3))
        P[:3, 3] = srng.uniform(-2, 2, 3)
    return Warp(A=A, P=P, amps=amps, waves=waves, phases=phases)


# ---------------------------------------------------------------------------------------------
# phantom maps on a grid

@dataclass
class PhantomMaps:
    fractions: dict          # bundle -> float (X,Y,Z) volume fraction of the bundle's tensor
    directions: dict         # bundle -> float (X,Y,Z,3) unit fibre direction in world (0 if absent)
    occupancy: dict          # bundle -> float (X,Y,Z) fraction of sub-voxel samples in the bundle
    tissue: dict             # 'WM','GM','CSF' -> float (X,Y,Z)
    iso_wm: np.ndarray       # isotropic fraction inside WM
    streamlines: dict        # bundle -> list of (k,3) arrays, subject world mm


def _subsample_points(shape, affine, n):
    offs = (np.arange(n) + 0.5) / n - 0.5
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape[:3]], indexing="ij"), -1)
    grid = grid.reshape(-1, 3).astype(float)
    sub = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), -1).reshape(-1, 3)
    vox = (grid[:, None, :] + sub[None, :, :]).reshape(-1, 3)
    return _apply(np.asarray(affine, float), vox)  # (n_vox * n^3, 3), voxel-major


def map_streamlines(streamlines: dict, func) -> dict:
    """Apply a point map ``func`` ((n,3) -> (n,3)) to ``{bundle: [fibres]}`` in one call."""
    names = list(streamlines)
    lens = [len(f) for n in names for f in streamlines[n]]
    if not lens:
        return {n: [] for n in names}
    out = np.split(func(np.concatenate([f for n in names for f in streamlines[n]])),
                   np.cumsum(lens)[:-1])
    res, k = {}, 0
    for n in names:
        res[n] = out[k:k + len(streamlines[n])]
        k += len(streamlines[n])
    return res


def phantom_maps(shape, affine, warp: Warp, size: str = "small") -> PhantomMaps:
    geom = phantom.geometry(size)
    shape = tuple(int(s) for s in shape[:3])
    n_vox = int(np.prod(shape))
    ns = geom.subsample ** 3
    pts = _subsample_points(shape, affine, geom.subsample)
    chunk = 1 << 20
    cls = np.concatenate([phantom.tissue_class(warp.to_template(pts[i:i + chunk]), geom)
                          for i in range(0, len(pts), chunk)])
    inner = cls == INNER

    streamlines = map_streamlines(phantom.template_trajectories(size), warp.from_template)
    member, tangents = {}, {}
    idx_in = np.flatnonzero(inner)
    p_in = pts[idx_in]
    for name in BUNDLES:
        fibres = streamlines[name]
        allp = np.concatenate(fibres)
        tang = np.concatenate([np.gradient(f, axis=0) for f in fibres])
        tang /= np.maximum(np.linalg.norm(tang, axis=1, keepdims=True), 1e-12)
        lo = allp.min(0) - 2 * phantom.OCCUPANCY_RADIUS
        hi = allp.max(0) + 2 * phantom.OCCUPANCY_RADIUS
        inb = ((p_in[:, 0] >= lo[0]) & (p_in[:, 0] <= hi[0]) & (p_in[:, 1] >= lo[1])
               & (p_in[:, 1] <= hi[1]) & (p_in[:, 2] >= lo[2]) & (p_in[:, 2] <= hi[2]))
        cand = idx_in[inb]
        dist, idx = cKDTree(allp).query(pts[cand], distance_upper_bound=phantom.OCCUPANCY_RADIUS)
        hit = np.isfinite(dist)
        member[name] = cand[hit]
        tangents[name] = tang[idx[hit]]

    count = np.zeros(pts.shape[0], dtype=np.int16)
    for name in BUNDLES:
        count[member[name]] += 1
    wm_s = count > 0
    fractions, directions, occupancy = {}, {}, {}
    for name in BUNDLES:
        m = member[name]
        vox = m // ns
        w = (1.0 - ISO_FRACTION_WM) / count[m]
        fractions[name] = (np.bincount(vox, weights=w, minlength=n_vox) / ns).reshape(shape)
        occupancy[name] = (np.bincount(vox, minlength=n_vox) / ns).reshape(shape)
        # sign-invariant mean direction: principal eigenvector of the summed outer products
        t = tangents[name]
        comps = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
        acc = np.stack([np.bincount(vox, weights=t[:, a] * t[:, b], minlength=n_vox)
                        for a, b in comps], axis=1)
        has = np.flatnonzero(acc[:, 0] + acc[:, 3] + acc[:, 5] > 0)
        mats = np.zeros((len(has), 3, 3))
        for c, (a, b) in enumerate(comps):
            mats[:, a, b] = acc[has, c]
            mats[:, b, a] = acc[has, c]
        _, vecs = np.linalg.eigh(mats)
        dirs = np.zeros((n_vox, 3))
        dirs[has] = vecs[:, :, -1]
        directions[name] = dirs.reshape(shape + (3,))

    gm_s = (cls == CORTEX) | (inner & ~wm_s)
    tissue = {
        "WM": (np.bincount(np.flatnonzero(wm_s) // ns, minlength=n_vox) / ns).reshape(shape),
        "GM": (np.bincount(np.flatnonzero(gm_s) // ns, minlength=n_vox) / ns).reshape(shape),
        "CSF": (np.bincount(np.flatnonzero(cls == CSF) // ns, minlength=n_vox) / ns).reshape(shape),
    }
    return PhantomMaps(fractions, directions, occupancy, tissue,
                       tissue["WM"] * ISO_FRACTION_WM, streamlines)


def _compartments(maps: PhantomMaps, patient: bool):
    """(weight*S0 map, axial, radial, direction-or-None) for every compartment."""
    out = []
    for name in BUNDLES:
        rd = LAMBDA_PERP * (PATIENT_RD_FACTOR if (patient and name == PATIENT_BUNDLE) else 1.0)
        out.append((maps.fractions[name] * S0["WM"], LAMBDA_PAR, rd, maps.directions[name]))
    out.append((maps.iso_wm * S0["WM"] + maps.tissue["GM"] * S0["GM"], D_GM, D_GM, None))
    out.append((maps.tissue["CSF"] * S0["CSF"], D_CSF, D_CSF, None))
    return out


def true_fa(maps: PhantomMaps, patient: bool = False) -> np.ndarray:
    """FA of the S0-weighted mean diffusion tensor of the compartments (noise-free, low-b)."""
    shape = maps.tissue["WM"].shape
    dmix = np.zeros(shape + (3, 3))
    wsum = np.zeros(shape)
    for w, lpar, lperp, e in _compartments(maps, patient):
        wsum += w
        dmix += (w * lperp)[..., None, None] * np.eye(3)
        if e is not None:
            dmix += (w * (lpar - lperp))[..., None, None] * (e[..., :, None] * e[..., None, :])
    inside = wsum > 0
    ev = np.linalg.eigvalsh(dmix[inside] / wsum[inside][:, None, None])
    md = ev.mean(1, keepdims=True)
    fa = np.sqrt(1.5 * np.sum((ev - md) ** 2, 1) / np.maximum(np.sum(ev ** 2, 1), 1e-30))
    out = np.zeros(shape)
    out[inside] = fa
    return out


def synth_signal(maps: PhantomMaps, affine, bvals, bvecs_voxel, patient: bool = False):
    """Noise-free multi-tensor DWI (X,Y,Z,N) and S0 map."""
    shape = maps.tissue["WM"].shape
    sig = np.zeros(shape + (len(bvals),), dtype=np.float32)
    for k, vol in synth_volumes(maps, affine, bvals, bvecs_voxel, patient):
        sig[..., k] = vol
    s0 = sum(w for w, *_ in _compartments(maps, patient))
    return sig, s0


def synth_volumes(maps: PhantomMaps, affine, bvals, bvecs_voxel, patient: bool = False):
    """The noise-free volumes one at a time: ``(index, float32 (X,Y,Z))`` (large grids)."""
    g = np.asarray(bvecs_voxel, float) @ voxel_frame(affine).T      # world-frame gradients
    bvals = np.asarray(bvals, float)
    shape = maps.tissue["WM"].shape
    comps = []
    for w, lpar, lperp, e in _compartments(maps, patient):
        m = w > 0
        if m.any():
            comps.append((m, w[m], lpar, lperp, None if e is None else e[m]))
    for k in range(len(bvals)):
        vol = np.zeros(shape, dtype=np.float32)
        for m, w, lpar, lperp, e in comps:
            if e is None:
                vol[m] += w * np.exp(-bvals[k] * lperp)
            else:
                cos2 = (e @ g[k]) ** 2
                vol[m] += w * np.exp(-bvals[k] * (lperp + (lpar - lperp) * cos2))
        yield k, vol


def add_rician(sig: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (float32, one volume at a time)."""
    out = np.empty(sig.shape, dtype=np.float32)
    vol_shape = sig.shape[:3]
    for v in range(sig.shape[-1] if sig.ndim == 4 else 1):
        s = sig[..., v] if sig.ndim == 4 else sig
        re = rng.standard_normal(vol_shape, dtype=np.float32) * np.float32(sigma) + s
        im = rng.standard_normal(vol_shape, dtype=np.float32) * np.float32(sigma)
        mag = np.sqrt(re * re + im * im)
        if sig.ndim == 4:
            out[..., v] = mag
        else:
            out[...] = mag
    return out


# ---------------------------------------------------------------------------------------------
# public entry point

@dataclass
class SubjectSim:
    """One simulated subject (everything in the subject's native grid / world RAS mm)."""

    dwi: np.ndarray                 # float32 (X,Y,Z,N), Rician noise (int16, rounded, for "hcp")
    affine: np.ndarray              # 4x4 voxel -> world RAS mm
    bvals: np.ndarray               # (N,)
    bvecs_voxel: np.ndarray         # (N,3) scaled-voxel-axis frame, unit for b>0
    bundle_masks: dict              # name -> bool (X,Y,Z): occupancy >= 0.25 or traversed
    tissue: dict                    # 'WM','GM','CSF' -> float (X,Y,Z) probabilities
    true_fa: np.ndarray             # float32 (X,Y,Z), noise-free
    streamlines: dict               # name -> list of (k,3) float arrays, subject world RAS mm
    to_template: Callable           # (n,3) subject world mm -> (n,3) template mm
    from_template: Callable         # inverse of to_template
    deformation_affine: np.ndarray  # 4x4 affine part of to_template
    bundle_fractions: dict          # name -> float (X,Y,Z) occupancy fraction (partial volume)
    bundle_dirs: dict               # name -> float32 (X,Y,Z,3) unit fibre direction, world frame
    brain_mask: np.ndarray          # bool (X,Y,Z)
    noise_free: np.ndarray | None   # float32 (X,Y,Z,N) (None for "hcp": not kept)
    t1w: np.ndarray                 # float32 (X,Y,Z) T1w-like contrast (WM bright)
    sigma: float                    # Rician noise sigma
    patient: bool
    warp: Warp

    @property
    def bvecs_fsl(self) -> np.ndarray:
        """bvecs as written to a BIDS ``.bvec`` file for this affine."""
        return voxel_to_fsl_bvecs(self.bvecs_voxel, self.affine)

    def label_image(self) -> np.ndarray:
        """uint8 (X,Y,Z,len(BUNDLES)) bundle masks in BUNDLES order."""
        return np.stack([self.bundle_masks[b] for b in BUNDLES], axis=-1).astype(np.uint8)

    def deformation_field(self) -> np.ndarray:
        """float32 (X,Y,Z,3): template position minus subject position (mm) at voxel centres."""
        shape = self.dwi.shape[:3]
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        x = _apply(self.affine, ijk.reshape(-1, 3).astype(float))
        return (self.to_template(x) - x).reshape(shape + (3,)).astype(np.float32)


MASK_OCCUPANCY = 0.25


def bundle_masks(maps: PhantomMaps, affine) -> dict:
    """Bundle masks: voxels at least 25% occupied by the bundle or traversed by one of its
    true trajectories (so every true streamline point lies inside its bundle's mask)."""
    shape = maps.tissue["WM"].shape
    inv = np.linalg.inv(np.asarray(affine, float))
    out = {}
    for b in BUNDLES:
        m = maps.occupancy[b] >= MASK_OCCUPANCY
        if maps.streamlines[b]:
            ijk = np.rint(_apply(inv, np.concatenate(maps.streamlines[b]))).astype(int)
            ok = np.all((ijk >= 0) & (ijk < np.asarray(shape)), axis=1)
            m[tuple(ijk[ok].T)] = True
        out[b] = m
    return out


def simulate_subject(*, shape, affine, bvals, bvecs_voxel, seed: int = 0, deformation: bool = True,
                     patient: bool = False, snr: float = 30.0, size: str = "small",
                     session: int = 0) -> SubjectSim:
    """Simulate one subject on the grid ``(shape, affine)`` (any orientation, oblique, anisotropic).

    ``bvecs_voxel`` are in the grid's scaled-voxel-axis frame.  ``seed`` fixes the anatomy
    (warp) and, with ``session``, the head pose and the noise.  ``deformation=False`` makes
    subject world == template space.  ``snr <= 0`` or ``inf`` gives noise-free data.
    """
    affine = np.asarray(affine, dtype=float)
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs_voxel = np.asarray(bvecs_voxel, dtype=float).reshape(-1, 3)
    if bvecs_voxel.shape[0] != bvals.size:
        raise ValueError("bvals and bvecs_voxel have different lengths")
    shape = tuple(int(s) for s in shape[:3])
    warp = random_warp(seed, size, session) if deformation else Warp()
    maps = phantom_maps(shape, affine, warp, size)
    sigma = S0["WM"] / snr if (snr and np.isfinite(snr) and snr > 0) else 0.0
    rng = np.random.default_rng([int(seed), 13, int(session)])
    if size == "hcp":   # volume by volume into int16: the float32 image alone would be 4 GB
        clean = None
        noisy = np.empty(shape + (len(bvals),), dtype=np.int16)
        for k, vol in synth_volumes(maps, affine, bvals, bvecs_voxel, patient):
            noisy[..., k] = np.clip(np.rint(add_rician(vol, sigma, rng) if sigma > 0 else vol), 0, 32767)
    else:
        clean, _s0 = synth_signal(maps, affine, bvals, bvecs_voxel, patient)
        noisy = add_rician(clean, sigma, rng) if sigma > 0 else clean.copy()
    t1 = (T1W["WM"] * maps.tissue["WM"] + T1W["GM"] * maps.tissue["GM"]
          + T1W["CSF"] * maps.tissue["CSF"])
    if sigma > 0:
        t1 = add_rician(t1, sigma / 2, rng)
    brain = (maps.tissue["WM"] + maps.tissue["GM"] + maps.tissue["CSF"]) >= 0.5
    return SubjectSim(
        dwi=noisy if noisy.dtype == np.int16 else noisy.astype(np.float32, copy=False), affine=affine, bvals=bvals,
        bvecs_voxel=bvecs_voxel,
        bundle_masks=bundle_masks(maps, affine),
        tissue=maps.tissue, true_fa=true_fa(maps, patient).astype(np.float32),
        streamlines=maps.streamlines, to_template=warp.to_template,
        from_template=warp.from_template, deformation_affine=warp.affine,
        bundle_fractions=maps.occupancy,
        bundle_dirs={b: maps.directions[b].astype(np.float32) for b in BUNDLES},
        brain_mask=brain, noise_free=clean, t1w=t1.astype(np.float32),
        sigma=float(sigma), patient=bool(patient), warp=warp)


def demo_grid(size: str = "small", orientation: str = "RAS", zooms=None,
              oblique_deg=(0.0, 0.0, 0.0), margin_mm: float = 0.0):
    """``(shape, affine)`` of a grid covering the phantom for ``size``.

    ``orientation``: three letters, one of R/L, A/P, S/I per voxel axis, possibly permuted
    (e.g. "LAS", "LPS", "ASR"); ``zooms``: voxel size per voxel axis (default: the size's
    isotropic voxel); ``oblique_deg``: rotations (x, y, z, degrees) applied in world.  The grid
    centre is the world origin; the field of view is the template's plus ``margin_mm``.
    """
    geom = phantom.geometry(size)
    fov = np.asarray(geom.grid_shape) * np.asarray(geom.zooms) + 2 * margin_mm
    orientation = orientation.upper()
    axes_of = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    if len(orientation) != 3 or any(c not in axes_of for c in orientation) or \
            sorted(axes_of[c][0] for c in orientation) != [0, 1, 2]:
        raise ValueError(f"bad orientation {orientation!r}")
    zooms = np.asarray(zooms if zooms is not None else geom.zooms, dtype=float)
    m = np.zeros((3, 3))
    shape = []
    for j, c in enumerate(orientation):
        axis, sign = axes_of[c]
        m[axis, j] = sign * zooms[j]
        shape.append(int(np.ceil(fov[axis] / zooms[j])))
    m = _rotation(oblique_deg) @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = -m @ ((np.asarray(shape, float) - 1) / 2)
    return tuple(shape), aff
