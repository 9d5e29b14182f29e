"""Model fits: DTI (WLS, DIPY) and an ODF model: CSA or OPDT (DIPY) on one shell, CSD on one shell
(DIPY), or multi-shell multi-tissue CSD (the constrained fit solved by :mod:`kernels.qp`).

The fits run in the image's scaled-voxel-axis frame (the frame of the b-vectors once converted
from the FSL convention), on the brain voxels only, block by block so that the memory they need is
bounded whatever the image size.  What they return is in the **world** (scanner RAS+) frame, the
frame MRtrix3 and BEP016's ``xyz`` reference use: the tensor's six elements (MRtrix3 order) and the
SH coefficients (MRtrix3's ``tournier07`` basis, non-legacy).

Whatever makes a fit less than the user asked for (SH order lowered to the number of directions,
shells left out, DTI on a high shell) is returned as a sentence in ``downgrades``: the workflow
logs each as a WARNING, writes them into the sidecar and the QC figure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from kernels.frames import sh_conversion, voxel_frame

from .errors import InputDataError
from .inputs import B0_THRESHOLD, DwiData

log = logging.getLogger(__name__)

DTI_MAX_B = 1600.0  # shells above this leave the Gaussian regime; DTI uses b <= this
SH_BASIS = "tournier07"
SH_BASIS_BIDS = "MRtrix3"
DEFAULT_SH_ORDER = 8
# MRtrix3 order of the 6 unique tensor elements; dipy's lower_triangular is xx, xy, yy, xz, yz, zz
TENSOR_ORDER = ("Dxx", "Dyy", "Dzz", "Dxy", "Dxz", "Dyz")
_DIPY_TO_MRTRIX = (0, 2, 5, 1, 3, 4)
# Laplace-Beltrami regularisation of the CSA/OPDT fits (dipy's default; the bootstrap uses it too)
ODF_SMOOTH = 0.006
# tissue selection for the MSMT-CSD responses (FA, MD of the DTI fit; MD in mm^2/s)
RESPONSE_WM_FA = (0.7, 0.6, 0.5)
RESPONSE_GM = {"fa_max": 0.2, "md_min": 0.4e-3, "md_max": 1.2e-3}
RESPONSE_CSF = {"fa_max": 0.2, "md_min": 2.5e-3}
MIN_RESPONSE_VOXELS = 30


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


def max_sh_order(n_directions: int, requested: int | None, default: int = DEFAULT_SH_ORDER) -> int:
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


def _b(v: float) -> str:
    return f"b={v:g}"


def block_size(n_values: int, memory_budget: int | None = None) -> int:
    """Voxels per block of a model fit: ~1/16 of the budget for the block's signal and the fit's
    temporaries (about 64 bytes per value), between 2,000 and 50,000."""
    budget = memory_budget or (4 << 30)
    return int(np.clip(budget // 16 // (64 * max(n_values, 1)), 2_000, 50_000))


def _blocks(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="block", leave=False, disable=None if progress else True,
                total=len(starts))


# --------------------------------------------------------------------------- DTI

@dataclass
class DtiResult:
    fa: np.ndarray
    md: np.ndarray
    ad: np.ndarray
    rd: np.ndarray
    tensor: np.ndarray  # (..., 6) in TENSOR_ORDER, world axes
    v1: np.ndarray  # (..., 3) principal eigenvector, scaled-voxel-axis frame
    bvalues: list = field(default_factory=list)
    downgrades: list = field(default_factory=list)

    def transformed(self, m: np.ndarray, affine) -> "DtiResult":
        """The fit the same data give with b-vectors ``m @ g`` (voxel frame; ``m`` a signed
        permutation): eigenvalues are unchanged, eigenvectors and the tensor rotate."""
        rot = voxel_frame(affine)
        w = rot @ m @ rot.T                      # the same map in world axes
        d = _tensor_matrix(self.tensor)
        d = w @ d @ w.T
        return DtiResult(fa=self.fa, md=self.md, ad=self.ad, rd=self.rd, tensor=_tensor_six(d),
                         v1=(self.v1 @ m.T).astype(np.float32), bvalues=self.bvalues,
                         downgrades=self.downgrades)


def _tensor_matrix(six: np.ndarray) -> np.ndarray:
    xx, yy, zz, xy, xz, yz = np.moveaxis(np.asarray(six, dtype=np.float64), -1, 0)
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)


def _tensor_six(d: np.ndarray) -> np.ndarray:
    return np.stack([d[..., 0, 0], d[..., 1, 1], d[..., 2, 2], d[..., 0, 1], d[..., 0, 2], d[..., 1, 2]],
                    -1).astype(np.float32)


def tensor_to_world(six_voxel: np.ndarray, affine) -> np.ndarray:
    """Tensor elements (MRtrix3 order) from the voxel frame to world axes: D_w = R D R'."""
    rot = voxel_frame(affine)
    return _tensor_six(rot @ _tensor_matrix(six_voxel) @ rot.T)


def dti_shells(bvals) -> tuple[list[float], list[str]]:
    """The shells DTI uses, and the downgrade when it has to use a high one."""
    all_shells = shells(bvals)
    keep = [s for s in all_shells if s <= DTI_MAX_B]
    if keep:
        return keep, []
    keep = all_shells[:1]
    return keep, [f"DTI fitted on the {_b(keep[0])} shell: no shell at b <= {DTI_MAX_B:g} (the Gaussian "
                  "regime), so FA/MD/AD/RD are biased (MD lower, FA different) compared with a b~1000 fit"]


def fit_dti(dwi: DwiData, mask: np.ndarray, memory_budget: int | None = None,
            progress: bool = False) -> DtiResult:
    from dipy.reconst.dti import TensorModel

    keep_shells, downgrades = dti_shells(dwi.bvals)
    sel = shell_selection(dwi.bvals, keep_shells)
    n_dw = int((dwi.bvals[sel] > B0_THRESHOLD).sum())
    if n_dw < 6:
        raise InputDataError(f"DTI needs at least 6 diffusion-weighted volumes at b <= {DTI_MAX_B:g}; found {n_dw}")
    model = TensorModel(dwi.gtab(sel), fit_method="WLS")
    rows = dwi.rows(mask)
    n = len(rows)
    out = {k: np.zeros(n, np.float32) for k in ("fa", "md", "ad", "rd")}
    six = np.zeros((n, 6), np.float32)
    v1 = np.zeros((n, 3), np.float32)
    size = block_size(int(sel.sum()) + 12, memory_budget)
    with np.errstate(all="ignore"):
        for a in _blocks(n, size, "DTI", progress):
            b = min(n, a + size)
            fit = model.fit(dwi.signal[rows[a:b]][:, sel])
            out["fa"][a:b] = np.clip(np.nan_to_num(fit.fa), 0, 1)
            out["md"][a:b] = np.nan_to_num(fit.md)
            out["ad"][a:b] = np.nan_to_num(fit.ad)
            out["rd"][a:b] = np.nan_to_num(fit.rd)
            six[a:b] = np.nan_to_num(fit.lower_triangular())[..., _DIPY_TO_MRTRIX]
            v1[a:b] = np.nan_to_num(fit.evecs[..., :, 0])

    def grid(values):
        g = np.zeros(mask.shape + values.shape[1:], np.float32)
        g[mask] = values
        return g

    return DtiResult(fa=grid(out["fa"]), md=grid(out["md"]), ad=grid(out["ad"]), rd=grid(out["rd"]),
                     tensor=grid(tensor_to_world(six, dwi.affine)), v1=grid(v1), bvalues=keep_shells,
                     downgrades=downgrades)


def color_fa(fa: np.ndarray, v1: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Colour-FA in world axes (red L-R, green A-P, blue I-S), values in [0, 1]."""
    v1w = v1 @ voxel_frame(affine).T  # voxel frame -> world
    return (np.abs(v1w) * fa[..., None]).clip(0, 1).astype(np.float32)


# --------------------------------------------------------------------------- ODF

@dataclass
class OdfResult:
    sh: np.ndarray  # (..., n_coef) MRtrix3 basis, world frame
    sh_order: int
    model: str
    gfa: np.ndarray | None
    parameters: dict
    bvalues: list
    description: str = ""
    downgrades: list = field(default_factory=list)


def fit_odf(dwi: DwiData, mask: np.ndarray, model: str, requested_order: int | None,
            fa: np.ndarray | None = None, md: np.ndarray | None = None, nthreads: int | None = None,
            memory_budget: int | None = None, device: str = "cpu", progress: bool = False) -> OdfResult:
    """Fit the ODF model in ``mask``.  CSD on data with two or more shells is multi-shell
    multi-tissue CSD; CSA/OPDT, and CSD on one shell, use one shell (the lowest)."""
    all_shells = shells(dwi.bvals)
    downgrades: list[str] = []
    if model == "csd" and len(all_shells) >= 2:
        try:
            return _fit_msmt(dwi, mask, requested_order, fa, md, nthreads, memory_budget, device, progress)
        except _MsmtUnavailable as why:
            downgrades.append(f"multi-shell multi-tissue CSD not possible ({why}): single-shell CSD on "
                              f"the {_b(all_shells[0])} shell instead")
    shell = all_shells[0]
    if len(all_shells) > 1:
        downgrades.append(f"{model.upper()} uses the {_b(shell)} shell only; the "
                          f"{', '.join(_b(s) for s in all_shells[1:])} shell(s) are not used")
    sel = shell_selection(dwi.bvals, [shell])
    gtab = dwi.gtab(sel)
    n_dirs = int((~gtab.b0s_mask).sum())
    order = max_sh_order(n_dirs, requested_order)
    if requested_order is None and order < DEFAULT_SH_ORDER:
        downgrades.append(f"SH order lowered from {DEFAULT_SH_ORDER} to {order}: the {_b(shell)} shell has "
                          f"{n_dirs} directions (order {DEFAULT_SH_ORDER} needs "
                          f"{(DEFAULT_SH_ORDER + 1) * (DEFAULT_SH_ORDER + 2) // 2})")
    params: dict = {"SphericalHarmonicDegree": order, "BValue": shell}
    rows, coef, to_world = _sh_rows(dwi, mask, order)
    n, ncoef = coef.shape
    gfa = np.zeros(n, np.float32) if model in ("csa", "opdt") else None
    size = block_size(int(sel.sum()) + 4 * ncoef, memory_budget)
    if model in ("csa", "opdt"):
        from dipy.reconst.shm import CsaOdfModel, OpdtModel
        m = (CsaOdfModel if model == "csa" else OpdtModel)(gtab, sh_order_max=order, smooth=ODF_SMOOTH)
        params.update({"Regularization": ODF_SMOOTH})
        fit_kw = {}
        description = {"csa": "Constant solid angle q-ball ODF (dipy CsaOdfModel)",
                       "opdt": "Orientation probability density transform (dipy OpdtModel)"}[model]
    elif model == "csd":
        m, params_csd = _csd_model(gtab, dwi, sel, mask, order, fa)
        params.update(params_csd)
        fit_kw = _parallel_kwargs(nthreads)
        description = "Constrained spherical deconvolution fibre ODF (dipy, single-shell single-tissue)"
    else:  # argparse restricts the choices; this is a programming error
        raise ValueError(model)
    with np.errstate(all="ignore"):
        for a in _blocks(n, size, model.upper(), progress):
            b = min(n, a + size)
            fit = m.fit(dwi.signal[rows[a:b]][:, sel], **fit_kw)
            coef[a:b] = np.nan_to_num(np.asarray(fit.shm_coeff, dtype=np.float64)) @ to_world
            if gfa is not None:
                gfa[a:b] = np.clip(np.nan_to_num(fit.gfa), 0, 1)
    return OdfResult(sh=_grid(coef, mask), sh_order=order, model=model,
                     gfa=None if gfa is None else _grid(gfa, mask), parameters=params, bvalues=[shell],
                     description=description, downgrades=downgrades)


def _sh_rows(dwi: DwiData, mask: np.ndarray, order: int):
    """The signal rows of ``mask``, an output array for their SH coefficients, and the matrix taking
    DIPY's coefficients (descoteaux07 legacy, voxel frame) to ours (tournier07, world frame)."""
    rows = dwi.rows(mask)
    coef = np.zeros((len(rows), (order + 1) * (order + 2) // 2), np.float32)
    to_world = sh_conversion(order, basis="descoteaux07", legacy=True, frame="voxel", affine=dwi.affine,
                             to_basis=SH_BASIS, to_legacy=False, to_frame="world")
    return rows, coef, to_world


def _grid(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    g = np.zeros(mask.shape + values.shape[1:], np.float32)
    g[mask] = values
    return g


def _as_image(signal: np.ndarray) -> np.ndarray:
    """(n, N) voxel rows as a (n, 1, 1, N) image, for DIPY functions that want 4D data."""
    return signal[:, None, None, :]


def _wm_response_voxels(mask, fa):
    if fa is None:
        raise ValueError("CSD response estimation needs the FA map")
    for thr in RESPONSE_WM_FA:
        wm = mask & (fa > thr)
        if wm.sum() >= 50:
            return wm, thr
    return wm, thr


def _csd_model(gtab, dwi, sel, mask, order, fa):
    from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, response_from_mask_ssst

    wm, thr = _wm_response_voxels(mask, fa)
    if wm.sum() < 10:
        raise InputDataError("CSD: too few single-fibre voxels (FA > 0.5) to estimate a response function; "
                             "use --odf-model csa")
    sig = dwi.signal[dwi.rows(wm)][:, sel]
    response, _ratio = response_from_mask_ssst(gtab, _as_image(sig), np.ones(sig.shape[0], bool)[:, None, None])
    evals, s0 = response
    model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=order)
    params = {"ResponseFunction": {"Eigenvalues": [float(e) for e in evals], "S0": float(s0),
                                   "SingleFibreVoxels": int(wm.sum()), "FAThreshold": thr},
              "NonNegativityConstraint": "soft", "Lambda": 1.0, "Tau": 0.1}
    return model, params


class _MsmtUnavailable(Exception):
    pass


def _fit_msmt(dwi, mask, requested_order, fa, md, nthreads, memory_budget, device, progress) -> OdfResult:
    """Multi-shell multi-tissue CSD (Jeurissen et al. 2014): WM FOD + GM + CSF, DIPY's model matrices
    (``MultiShellDeconvModel``), the exact constrained fit of :class:`kernels.qp.ConstrainedLeastSquares`."""
    from dipy.data import default_sphere
    from dipy.reconst.mcsd import MultiShellDeconvModel, multi_shell_fiber_response, response_from_mask_msmt

    from kernels.qp import STATUS_NAMES, ConstrainedLeastSquares

    if fa is None or md is None:
        raise ValueError("MSMT-CSD response estimation needs the FA and MD maps")
    all_shells = shells(dwi.bvals)
    sel = shell_selection(dwi.bvals, all_shells)
    gtab = dwi.gtab(sel)
    rounded = np.round(dwi.bvals[sel] / 100) * 100
    n_dirs = max(int((rounded == s).sum()) for s in all_shells)
    order = max_sh_order(n_dirs, requested_order)
    downgrades = []
    if requested_order is None and order < DEFAULT_SH_ORDER:
        downgrades.append(f"SH order lowered from {DEFAULT_SH_ORDER} to {order}: the largest shell has "
                          f"{n_dirs} directions")
    wm, wm_thr = _wm_response_voxels(mask, fa)
    gm = mask & (fa < RESPONSE_GM["fa_max"]) & (md > RESPONSE_GM["md_min"]) & (md < RESPONSE_GM["md_max"])
    csf = mask & (fa < RESPONSE_CSF["fa_max"]) & (md > RESPONSE_CSF["md_min"])
    counts = {"WM": int(wm.sum()), "GM": int(gm.sum()), "CSF": int(csf.sum())}
    short = [k for k, v in counts.items() if v < MIN_RESPONSE_VOXELS]
    if short:
        raise _MsmtUnavailable(f"too few {'/'.join(short)} voxels for the tissue responses: {counts}")
    tissues = wm | gm | csf
    sig = dwi.signal[dwi.rows(tissues)][:, sel]
    img = _as_image(sig)

    def sub(m):
        return m[tissues][:, None, None]

    bvals_model = np.where(gtab.bvals <= B0_THRESHOLD, 0.0, np.round(gtab.bvals / 100) * 100)
    from dipy.core.gradients import gradient_table
    gtab_model = gradient_table(bvals_model, bvecs=gtab.bvecs, b0_threshold=B0_THRESHOLD)
    with np.errstate(all="ignore"):
        r_wm, r_gm, r_csf = response_from_mask_msmt(gtab_model, img, sub(wm), sub(gm), sub(csf))
    ubvals = np.array([0.0] + all_shells)
    response = multi_shell_fiber_response(order, bvals=ubvals, wm_rf=r_wm, gm_rf=r_gm, csf_rf=r_csf)
    model = MultiShellDeconvModel(gtab_model, response, sh_order_max=order, reg_sphere=default_sphere)
    solver = ConstrainedLeastSquares(model._X, model.fitter._reg.T)
    iso = response.iso                          # x: the isotropic tissues, then the WM FOD
    rows, coef, to_world = _sh_rows(dwi, mask, order)
    n = len(rows)
    failed, why = [], set()
    _set_threads(nthreads)
    size = block_size(int(sel.sum()) + 2 * solver.n, memory_budget)
    for a in _blocks(n, size, "MSMT-CSD", progress):
        b = min(n, a + size)
        x, status = solver.solve(dwi.signal[rows[a:b]][:, sel], device=device)
        coef[a:b] = x[:, iso:] @ to_world
        bad = np.flatnonzero(status != 0)
        failed.extend((a + bad).tolist())
        why.update(STATUS_NAMES.get(int(s), str(s)) for s in status[bad])
    if failed:
        coef[failed] = 0
        downgrades.append(f"MSMT-CSD: {len(failed)} voxel(s) not solved ({', '.join(sorted(why))}); "
                          "their FOD is set to 0")
    resp_desc = {name: {"Eigenvalues": [[float(v) for v in row[:3]] for row in r],
                        "S0": [float(row[3]) for row in r], "Voxels": counts[name]}
                 for name, r in (("WM", r_wm), ("GM", r_gm), ("CSF", r_csf))}
    params = {"SphericalHarmonicDegree": order, "BValues": all_shells, "Tissues": ["WM", "GM", "CSF"],
              "ResponseFunctions": resp_desc, "WMResponseFAThreshold": wm_thr,
              "NonNegativityConstraint": f"hard (WM FOD on {len(default_sphere.vertices)} directions, "
                                         "GM and CSF >= 0), solved exactly (Goldfarb-Idnani)",
              "UnsolvedVoxels": int(len(failed))}
    return OdfResult(sh=_grid(coef, mask), sh_order=order, model="csd", gfa=None, parameters=params,
                     bvalues=all_shells, downgrades=downgrades,
                     description="Multi-shell multi-tissue constrained spherical deconvolution "
                                 "(Jeurissen et al. 2014): WM fibre ODF (GM and CSF as isotropic tissues)")


def _set_threads(n):
    if n:
        import numba
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _parallel_kwargs(nthreads):
    import os
    n = nthreads or os.cpu_count() or 1
    if n <= 1:
        return {}
    # joblib's workers start as `python -m ...`, which puts the working directory (perhaps the input
    # dataset, with a planted numpy.py) first on sys.path: they must start without it
    os.environ["PYTHONSAFEPATH"] = "1"
    return {"engine": "joblib", "n_jobs": n}
