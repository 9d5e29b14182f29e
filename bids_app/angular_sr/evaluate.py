"""How much angular super-resolution helps CSD on a demo phantom subject (tests, README figures).

:func:`compare` takes one simulated subject (:func:`bids_app.demo.simulate.simulate_subject`, which
knows every voxel's true fibre directions), keeps ``n_keep`` well-spread directions per shell, and
fits CSD exactly as the participant level does (:func:`bids_app.models.fit_odf`: the lowest shell,
the highest SH order its directions allow, the response from FA > 0.7) on

* ``subsampled``: the kept directions alone,
* ``angular_sr``: the kept directions plus the model's predictions (acquired volumes unchanged),
* ``full``: all directions,

then scores the ODF peaks against the truth in *crossing voxels* (two bundles each filling at least
``CROSSING_OCCUPANCY`` of the voxel, more than ``CROSSING_MIN_ANGLE`` apart): for each of the two
true directions the angle to the nearest of the voxel's peaks (up to three; none: 90 degrees).
"""
from __future__ import annotations

import numpy as np

from ..demo.phantom import BUNDLES

CROSSING_OCCUPANCY = 0.35
CROSSING_MIN_ANGLE = 40.0      # degrees
PEAK_THRESHOLD = 0.25          # peaks below this fraction of the voxel's largest are ignored
PEAK_SEPARATION = 25.0         # degrees


def spread_subset(bvecs: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` of ``bvecs`` chosen by farthest-point sampling on the antipodal sphere."""
    v = np.asarray(bvecs, float)
    chosen = [0]
    d = 1 - np.abs(v @ v[0])
    for _ in range(n - 1):
        k = int(np.argmax(d))
        chosen.append(k)
        d = np.minimum(d, 1 - np.abs(v @ v[k]))
    return np.sort(np.array(chosen))


def subsample(bvals, bvecs, n_keep: int, b0_threshold: float = 50.0) -> np.ndarray:
    """Volume indices: every b=0 volume and ``n_keep`` spread directions of each shell."""
    from ..models import shells
    b = np.asarray(bvals, float)
    keep = list(np.flatnonzero(b <= b0_threshold))
    for s in shells(b):
        idx = np.flatnonzero((b > b0_threshold) & (np.abs(b - s) <= 50))
        keep += list(idx[spread_subset(np.asarray(bvecs)[idx], min(n_keep, len(idx)))])
    return np.sort(np.array(keep))


def crossing_truth(sim):
    """``(mask (X,Y,Z), directions (n, 2, 3) world)`` of the crossing voxels of a simulated subject."""
    occ = np.stack([sim.bundle_fractions[b] for b in BUNDLES], -1)
    dirs = np.stack([sim.bundle_dirs[b] for b in BUNDLES], -2)           # (X,Y,Z,B,3)
    order = np.argsort(-occ, axis=-1)[..., :2]
    top = np.take_along_axis(occ, order, -1)
    d = np.take_along_axis(dirs, order[..., None], -2)                   # (X,Y,Z,2,3)
    cos = np.abs(np.sum(d[..., 0, :] * d[..., 1, :], -1))
    mask = (top[..., 1] >= CROSSING_OCCUPANCY) & (cos < np.cos(np.radians(CROSSING_MIN_ANGLE))) & sim.brain_mask
    return mask, d[mask]


def peaks_world(sh, order: int, affine, mask) -> list:
    """Peaks (world unit vectors) of the MRtrix3-basis SH ODFs in ``mask`` (world-frame SH, as
    :func:`bids_app.models.fit_odf` returns them; ``affine`` is unused)."""
    from dipy.data import get_sphere
    from dipy.direction.peaks import peak_directions
    from dipy.reconst.shm import sh_to_sf

    sphere = get_sphere(name="repulsion724")
    sf = sh_to_sf(np.asarray(sh)[mask], sphere, sh_order_max=order, basis_type="tournier07", legacy=False)
    out = []
    for odf in sf:
        dirs, _, _ = peak_directions(odf, sphere, relative_peak_threshold=PEAK_THRESHOLD,
                                     min_separation_angle=PEAK_SEPARATION)
        out.append(dirs[:3] if len(dirs) else np.zeros((0, 3)))
    return out


def angular_errors(peaks: list, truth: np.ndarray) -> np.ndarray:
    """(n, 2) degrees: each true direction to the nearest peak of its voxel."""
    err = np.full(truth.shape[:2], 90.0)
    for n, (p, t) in enumerate(zip(peaks, truth)):
        if len(p):
            p = p / np.linalg.norm(p, axis=1, keepdims=True)
            cos = np.abs(t @ p.T).max(axis=1)
            err[n] = np.degrees(np.arccos(np.clip(cos, 0, 1)))
    return err


def _csd(data, bvals, bvecs, affine, fit_mask, brain, keep=None):
    from ..inputs import DwiData
    from ..models import fit_dti, fit_odf
    dwi = DwiData.from_array(data, affine, bvals, bvecs, mask=brain)
    fa_src = dwi if keep is None else DwiData.from_array(data[..., keep], affine, np.asarray(bvals)[keep],
                                                         np.asarray(bvecs)[keep], mask=brain)
    dti = fit_dti(fa_src, brain)
    mask = fit_mask | (brain & (dti.fa > 0.5))
    return fit_odf(dwi, mask, "csd", None, fa=dti.fa, md=dti.md, nthreads=1)


def compare(sim, model_path, *, n_keep: int = 12, n_new: int = 52, device: str = "cpu") -> dict:
    """Median crossing-voxel peak error (degrees) and SH order for subsampled / angular_sr / full."""
    from .modelfile import load_model
    from .predict import super_resolve
    cross, truth = crossing_truth(sim)
    brain = sim.brain_mask
    keep = subsample(sim.bvals, sim.bvecs_voxel, n_keep)
    module, info = load_model(model_path, device)
    sub = sim.dwi[..., keep]
    pred, new_b, new_v, _ = super_resolve(module, info, sub, sim.bvals[keep], sim.bvecs_voxel[keep], brain,
                                          n_new=n_new, device=device)
    cases = {
        "subsampled": (sub, sim.bvals[keep], sim.bvecs_voxel[keep], None),
        "angular_sr": (np.concatenate([sub, pred], -1), np.concatenate([sim.bvals[keep], new_b]),
                       np.concatenate([sim.bvecs_voxel[keep], new_v]), np.arange(len(keep))),
        "full": (sim.dwi, sim.bvals, sim.bvecs_voxel, None),
    }
    out = {"crossing_voxels": int(cross.sum()), "kept_volumes": int(len(keep))}
    for name, (data, b, v, k) in cases.items():
        odf = _csd(data, b, v, sim.affine, cross, brain, k)
        err = angular_errors(peaks_world(odf.sh, odf.sh_order, sim.affine, cross), truth)
        out[name] = {"median_error_deg": float(np.median(err)), "mean_error_deg": float(np.mean(err)),
                     "sh_order": int(odf.sh_order), "directions": int((b > 50).sum())}
    return out
