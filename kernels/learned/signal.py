"""The learned trackers' input: the diffusion signal of one shell as SH coefficients, world frame.

A model sees the normalised signal S/S0 of one shell, fitted per voxel with real, even SH of a
fixed order (MRtrix3's ``tournier07`` basis, ``legacy=False``) on gradient directions expressed in
world (RAS+) axes.  Whatever the gradient table (number and layout of directions) or the voxel order
and obliquity of the image, the same tissue gives the same coefficients, so a model trained on one
acquisition applies to another with enough directions on that shell.  numpy and dipy only (no torch).
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError, ParameterError
from ..frames import frame_rotation, n_coefficients, sh_matrix, voxel_frame

B0_THRESHOLD = 50.0        # s/mm^2: volumes at or below are b=0
SHELL_TOLERANCE = 100.0    # b-values within this of each other are one shell
SMOOTH = 0.006             # Laplace-Beltrami regularisation of the fit (DIPY's default for q-ball)
BASIS = "tournier07"       # with legacy=False: the MRtrix3 basis


def shells(bvals) -> list[float]:
    """Distinct non-zero b-values rounded to the shell tolerance, ascending."""
    b = np.asarray(bvals, dtype=np.float64).ravel()
    b = b[b > B0_THRESHOLD]
    return sorted({float(np.round(v / SHELL_TOLERANCE) * SHELL_TOLERANCE) for v in b})


def pick_shell(bvals, shell: float | None = None) -> float:
    """``shell`` if the data have it (within the tolerance), else the lowest shell when None."""
    available = shells(bvals)
    if not available:
        raise DataError("no diffusion-weighted volume (every b-value is <= 50)")
    if shell is None:
        return available[0]
    for s in available:
        if abs(s - shell) <= SHELL_TOLERANCE / 2:
            return s
    raise DataError(f"no b={shell:g} shell in the data (shells: {', '.join(f'{s:g}' for s in available)})")


def shell_volumes(bvals, shell: float) -> np.ndarray:
    """Boolean selection of the volumes on ``shell``."""
    b = np.asarray(bvals, dtype=np.float64).ravel()
    return (b > B0_THRESHOLD) & (np.abs(b - shell) <= SHELL_TOLERANCE / 2)


def check_order(bvals, shell: float, sh_order: int) -> None:
    """A :class:`DataError` when the shell has fewer directions than the order has coefficients."""
    n = int(shell_volumes(bvals, shell).sum())
    k = n_coefficients(sh_order)
    if n < k:
        raise DataError(f"SH order {sh_order} needs at least {k} directions on the b={shell:g} shell; "
                        f"the data have {n}")


def world_directions(bvecs, affine, frame: str) -> np.ndarray:
    """Unit gradient directions (N, 3) given in ``frame`` (``world``, ``voxel`` or ``fsl``, see
    :mod:`kernels.frames`) re-expressed in world axes; zero rows stay zero."""
    v = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    r = frame_rotation(frame, affine)            # voxel-frame direction u is r @ u in ``frame``
    return v @ r @ voxel_frame(affine).T


def signal_sh(dwi, bvals, bvecs, affine, *, frame: str, sh_order: int, shell: float | None = None,
              mask=None) -> np.ndarray:
    """(X, Y, Z, K) float32: S/S0 on one shell as ``tournier07`` SH coefficients in world axes.

    ``dwi`` (X, Y, Z, N); ``bvals`` (N,); ``bvecs`` (N, 3) unit vectors in ``frame``; ``shell``:
    the b-value to use (default: the lowest shell).  S0 is the mean of the b=0 volumes; S/S0 is
    clipped to [0, 1].  Voxels outside ``mask`` (when given) and without signal are zero.
    """
    from dipy.reconst.shm import smooth_pinv

    dwi = np.asarray(dwi)
    if dwi.ndim != 4:
        raise ParameterError("dwi", f"must be 4D (X, Y, Z, volumes), got shape {dwi.shape}")
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    if len(bvals) != dwi.shape[3] or np.asarray(bvecs).reshape(-1, 3).shape[0] != dwi.shape[3]:
        raise ParameterError("bvals", f"and bvecs must have one entry per volume ({dwi.shape[3]})")
    if sh_order < 0 or sh_order % 2:
        raise ParameterError("sh_order", f"must be an even number >= 0 (got {sh_order})")
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise DataError("no b=0 volume: the signal cannot be normalised")
    shell = pick_shell(bvals, shell)
    check_order(bvals, shell, sh_order)
    sel = shell_volumes(bvals, shell)
    dirs = world_directions(np.asarray(bvecs)[sel], affine, frame)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    basis = sh_matrix(dirs, sh_order, BASIS, False)                       # (n, K)
    degree = np.concatenate([[lv] * (2 * lv + 1) for lv in range(0, sh_order + 1, 2)]).astype(float)
    fit = smooth_pinv(basis, np.sqrt(SMOOTH) * degree * (degree + 1))        # (K, n), Laplace-Beltrami
    keep = np.ones(dwi.shape[:3], bool) if mask is None else np.asarray(mask, dtype=bool)
    out = np.zeros(dwi.shape[:3] + (basis.shape[1],), dtype=np.float32)
    idx = np.flatnonzero(sel)
    for z in range(dwi.shape[2]):                 # slice by slice: bounded temporary memory
        sl = np.asarray(dwi[:, :, z], dtype=np.float64)
        s0 = sl[..., b0].mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.clip(np.nan_to_num(sl[..., idx] / s0[..., None]), 0.0, 1.0)
        coef = norm @ fit.T
        coef[(s0 <= 0) | ~keep[:, :, z]] = 0.0
        out[:, :, z] = coef
    return out
