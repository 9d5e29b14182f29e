"""Model fits with dipy: DTI (WLS) and an ODF model (CSA, OPDT or CSD).

All orientations are in the image's scaled-voxel-axis frame (the frame of the
b-vectors once converted from the FSL convention).  SH coefficients are
returned in the MRtrix3 basis (dipy ``tournier07``, ``legacy=False``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import InputDataError
from .inputs import B0_THRESHOLD, DwiData

log = logging.getLogger(__name__)

DTI_MAX_B = 1600.0  # shells above this leave the Gaussian regime; DTI uses b <= this
SH_BASIS = "tournier07"
SH_BASIS_BIDS = "MRtrix3"
# MRtrix3 order of the 6 unique tensor elements; dipy's lower_triangular is xx, xy, yy, xz, yz, zz
TENSOR_ORDER = ("Dxx", "Dyy", "Dzz", "Dxy", "Dxz", "Dyz")
_DIPY_TO_MRTRIX = (0, 2, 5, 1, 3, 4)
# Laplace-Beltrami regularisation of the CSA/OPDT fits (dipy's default; the bootstrap uses it too)
ODF_SMOOTH = 0.006


def shells(bvals: np.ndarray, tol: float = 100.0) -> list[float]:
    """Distinct non-zero b-values (rounded to ``tol``), ascending."""
    b = np.asarray(bvals)[np.asarray(bvals) > B0_THRESHOLD]
    return sorted({float(np.round(v / tol) * tol) for v in b})


def shell_selection(bvals: np.ndarray, keep_shells: list[float], tol: float = 100.0) -> np.ndarray:
    """Boolean mask of b=0 volumes plus volumes on the given shells."""
    rounded = np.round(np.asarray(bvals) / tol) * tol
    sel = np.asarray(bvals) <= B0_THRESHOLD
    for s in keep_shells:
        sel |= (rounded == s) & (np.asarray(bvals) > B0_THRESHOLD)
    return sel


def max_sh_order(n_directions: int, requested: int | None, default: int = 8) -> int:
    """Largest even order whose coefficient count fits the number of directions."""
    order = default if requested is None else requested
    while order > 2 and (order + 1) * (order + 2) // 2 > n_directions:
        order -= 2
    if (order + 1) * (order + 2) // 2 > n_directions:
        raise InputDataError(f"only {n_directions} diffusion directions: too few for any ODF model "
                             "(need at least 6)")
    if requested is not None and order != requested:
        raise InputDataError(f"--sh-order {requested} needs {(requested + 1) * (requested + 2) // 2} "
                             f"directions per shell but the data have {n_directions}; use --sh-order {order}")
    return order


@dataclass
class DtiResult:
    fa: np.ndarray
    md: np.ndarray
    ad: np.ndarray
    rd: np.ndarray
    tensor: np.ndarray  # (..., 6) in TENSOR_ORDER
    evecs: np.ndarray  # (..., 3, 3) columns = eigenvectors, voxel frame
    bvalues: list = field(default_factory=list)


def fit_dti(dwi: DwiData, mask: np.ndarray) -> DtiResult:
    from dipy.reconst.dti import TensorModel

    keep_shells = [s for s in shells(dwi.bvals) if s <= DTI_MAX_B] or shells(dwi.bvals)[:1]
    sel = shell_selection(dwi.bvals, keep_shells)
    if int((dwi.bvals[sel] > B0_THRESHOLD).sum()) < 6:
        raise InputDataError("DTI needs at least 6 diffusion-weighted volumes at b <= "
                             f"{DTI_MAX_B:g}; found {int((dwi.bvals[sel] > B0_THRESHOLD).sum())}")
    model = TensorModel(dwi.gtab(sel), fit_method="WLS")
    with np.errstate(all="ignore"):
        fit = model.fit(dwi.data[..., sel], mask=mask)
        fa = np.clip(np.nan_to_num(fit.fa), 0, 1)
        md = np.nan_to_num(fit.md)
        ad = np.nan_to_num(fit.ad)
        rd = np.nan_to_num(fit.rd)
        lt = np.nan_to_num(fit.lower_triangular())[..., _DIPY_TO_MRTRIX]
        evecs = np.nan_to_num(fit.evecs)
    for a in (fa, md, ad, rd):
        a[~mask] = 0
    lt[~mask] = 0
    return DtiResult(fa=fa.astype(np.float32), md=md.astype(np.float32), ad=ad.astype(np.float32),
                     rd=rd.astype(np.float32), tensor=lt.astype(np.float32), evecs=evecs.astype(np.float32),
                     bvalues=keep_shells)


def color_fa(fa: np.ndarray, evecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Colour-FA in world axes (red L-R, green A-P, blue I-S), values in [0, 1]."""
    from .gradients import voxel_frame
    rot = voxel_frame(affine)
    v1 = evecs[..., :, 0] @ rot.T  # voxel frame -> world
    return (np.abs(v1) * fa[..., None]).clip(0, 1).astype(np.float32)


@dataclass
class OdfResult:
    sh: np.ndarray  # (..., n_coef) MRtrix3 basis
    sh_order: int
    model: str
    gfa: np.ndarray | None
    parameters: dict
    bvalues: list


def _descoteaux_to_mrtrix(order: int) -> np.ndarray:
    """Matrix M with coef_mrtrix = coef_dipy_legacy @ M (both span the same space)."""
    from dipy.data import get_sphere
    from dipy.reconst.shm import sh_to_sf_matrix

    sphere = get_sphere(name="repulsion724")
    b_desc, _ = sh_to_sf_matrix(sphere, sh_order_max=order, basis_type="descoteaux07", legacy=True)
    _, inv_mrtrix = sh_to_sf_matrix(sphere, sh_order_max=order, basis_type=SH_BASIS, legacy=False)
    return b_desc @ inv_mrtrix


def fit_odf(dwi: DwiData, mask: np.ndarray, model: str, requested_order: int | None,
            fa: np.ndarray | None = None, nthreads: int | None = None) -> OdfResult:
    """Fit CSA/OPDT/CSD on one shell (the lowest one on multi-shell data)."""
    from dipy.reconst.shm import CsaOdfModel, OpdtModel

    shell = shells(dwi.bvals)[0]
    sel = shell_selection(dwi.bvals, [shell])
    gtab = dwi.gtab(sel)
    data = dwi.data[..., sel]
    n_dirs = int((~gtab.b0s_mask).sum())
    order = max_sh_order(n_dirs, requested_order)
    params: dict = {"SphericalHarmonicDegree": order, "BValue": shell}
    gfa = None
    with np.errstate(all="ignore"):
        if model in ("csa", "opdt"):
            cls = CsaOdfModel if model == "csa" else OpdtModel
            m = cls(gtab, sh_order_max=order, smooth=ODF_SMOOTH)
            fit = m.fit(data, mask=mask)
            coef = fit.shm_coeff
            gfa = np.clip(np.nan_to_num(fit.gfa), 0, 1).astype(np.float32)
            params.update({"Regularization": ODF_SMOOTH})
        elif model == "csd":
            coef, params_csd = _fit_csd(gtab, data, mask, order, fa, nthreads)
            params.update(params_csd)
        else:  # argparse restricts the choices; this is a programming error
            raise ValueError(model)
    coef = np.nan_to_num(np.asarray(coef, dtype=np.float64)) @ _descoteaux_to_mrtrix(order)
    coef[~mask] = 0
    return OdfResult(sh=coef.astype(np.float32), sh_order=order, model=model, gfa=gfa, parameters=params,
                     bvalues=[shell])


def _fit_csd(gtab, data, mask, order, fa, nthreads):
    from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, response_from_mask_ssst

    if fa is None:
        raise ValueError("CSD response estimation needs the FA map")
    for thr in (0.7, 0.6, 0.5):
        wm = mask & (fa > thr)
        if wm.sum() >= 50:
            break
    if wm.sum() < 10:
        raise InputDataError("CSD: too few single-fibre voxels (FA > 0.5) to estimate a response function; "
                             "use --odf-model csa")
    response, ratio = response_from_mask_ssst(gtab, data, wm)
    evals, s0 = response
    model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=order)
    fit = model.fit(data, mask=mask, **_parallel_kwargs(nthreads))
    params = {"ResponseFunction": {"Eigenvalues": [float(e) for e in evals], "S0": float(s0),
                                   "SingleFibreVoxels": int(wm.sum()), "FAThreshold": thr},
              "NonNegativityConstraint": "soft", "Lambda": 1.0, "Tau": 0.1}
    return fit.shm_coeff, params


def _parallel_kwargs(nthreads):
    import os
    n = nthreads or os.cpu_count() or 1
    if n <= 1:
        return {}
    # joblib's workers start as `python -m ...`, which puts the working directory (perhaps the input
    # dataset, with a planted numpy.py) first on sys.path: they must start without it
    os.environ["PYTHONSAFEPATH"] = "1"
    return {"engine": "joblib", "n_jobs": n}
