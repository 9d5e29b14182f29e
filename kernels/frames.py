"""Orientation frames of an image and spherical-harmonic bases: what the coefficients mean.

Frames (directions are unit vectors, SH coefficients are defined with respect to one of them):

* ``voxel``: the scaled-voxel-axis frame, whose axes are the image's voxel axes i, j, k (the
  columns of ``affine[:3, :3]`` normalised, made exactly orthonormal by a polar decomposition when
  the affine has shear).  BEP016 calls it ``ijk``.  The tracking kernels work in this frame.
* ``world``: scanner RAS+ axes, the frame of the affine's output (BEP016 ``xyz``).  MRtrix3 reads
  and writes SH and tensor images in this frame.
* ``fsl``: the voxel frame with its first axis negated when ``det(affine[:3, :3]) > 0``: the frame
  of FSL/BIDS ``.bvec`` files, hence of a DIPY fit made with those b-vectors as they are.

Bases (even orders only, real, antipodally symmetric): ``tournier07`` (MRtrix3) and
``descoteaux07`` (DIPY's default), each with DIPY's ``legacy`` flag.  MRtrix3 uses tournier07 with
``legacy=False``; DIPY's default is descoteaux07 with ``legacy=True``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import ParameterError

FRAMES = ("world", "voxel", "fsl")
BASES = ("tournier07", "descoteaux07")
# the legacy flag each basis has in the tool that made it popular
USUAL_LEGACY = {"tournier07": False, "descoteaux07": True}
INTERNAL_BASIS = ("tournier07", False)   # what the kernels read, in the voxel frame


def voxel_frame(affine) -> np.ndarray:
    """3x3 matrix whose columns are the unit voxel axes in world coordinates (orthonormal)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms == 0):
        raise ValueError("affine has a zero-length voxel axis")
    r = m / norms
    if not np.allclose(r.T @ r, np.eye(3), atol=1e-6):
        u, _, vt = np.linalg.svd(m)
        r = u @ vt
    return r


def fsl_flips_x(affine) -> bool:
    """True when the FSL convention negates the x component (``det(affine[:3,:3]) > 0``)."""
    return bool(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0)


def frame_rotation(frame: str, affine) -> np.ndarray:
    """R such that a direction ``u`` of the voxel frame is ``R @ u`` in ``frame``."""
    if frame == "voxel":
        return np.eye(3)
    if frame == "world":
        return voxel_frame(affine)
    if frame == "fsl":
        return np.diag([-1.0, 1.0, 1.0]) if fsl_flips_x(affine) else np.eye(3)
    raise ParameterError("frame", f"must be one of {', '.join(FRAMES)} (got {frame!r})")


def n_coefficients(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def sh_order_from_ncoef(ncoef: int) -> int:
    """Even SH order L such that (L+1)(L+2)/2 == ncoef."""
    order = int(round((-3 + np.sqrt(1 + 8 * ncoef)) / 2))
    if n_coefficients(order) != ncoef or order % 2:
        raise ParameterError("sh", f"has {ncoef} coefficients per voxel: not an even-order SH series")
    return order


@lru_cache(maxsize=4)
def _sample_directions() -> np.ndarray:
    from dipy.data import get_sphere
    return np.asarray(get_sphere(name="repulsion724").vertices, dtype=np.float64)


def sh_matrix(directions: np.ndarray, order: int, basis: str, legacy: bool) -> np.ndarray:
    """(N, K) values of the K basis functions of ``basis`` at unit ``directions`` (N, 3)."""
    from dipy.core.sphere import Sphere
    from dipy.reconst.shm import sh_to_sf_matrix

    if basis not in BASES:
        raise ParameterError("basis", f"must be one of {', '.join(BASES)} (got {basis!r})")
    b = sh_to_sf_matrix(Sphere(xyz=np.asarray(directions, dtype=np.float64)), sh_order_max=order,
                        basis_type=basis, legacy=bool(legacy), return_inv=False)
    return np.asarray(b, dtype=np.float64).T


def sh_conversion(order: int, *, basis: str, legacy: bool, frame: str, affine,
                  to_basis: str = "tournier07", to_legacy: bool = False,
                  to_frame: str = "voxel") -> np.ndarray | None:
    """(K, K) matrix M with ``coef_out = coef_in @ M``; None when nothing changes.

    Exact for every even order up to 16: both bases span the same space, which a rotation maps
    onto itself, and the sphere used to solve for M has more points than coefficients.
    """
    same_basis = (basis, bool(legacy)) == (to_basis, bool(to_legacy))
    if same_basis and frame == to_frame:
        return None
    verts = _sample_directions()
    r_in = frame_rotation(frame, affine)
    r_out = frame_rotation(to_frame, affine)
    if same_basis and np.allclose(r_in @ r_out.T, np.eye(3), rtol=0.0, atol=1e-12):
        return None        # frames that coincide (an axis-aligned RAS grid: world = voxel)
    # a direction d of the output frame is r_in @ r_out.T @ d in the input frame
    d_in = verts @ (r_in @ r_out.T).T
    b_in = sh_matrix(d_in, order, basis, legacy)             # (V, K)
    b_out = sh_matrix(verts, order, to_basis, to_legacy)     # (V, K)
    return (np.linalg.pinv(b_out) @ b_in).T


def convert_sh(sh: np.ndarray, *, basis: str, frame: str, affine, legacy: bool | None = None,
               to_basis: str = "tournier07", to_legacy: bool = False, to_frame: str = "voxel",
               dtype=np.float32, mask=None) -> np.ndarray:
    """SH coefficients (..., K) re-expressed in another basis and frame (default: the kernels').

    ``mask`` (the shape of ``sh`` less its last axis): convert only the voxels inside it and leave
    the others 0 (the tracking keeps the ODF of mask voxels only; a brain is a quarter of its grid).
    """
    sh = np.asarray(sh)
    legacy = USUAL_LEGACY.get(basis, False) if legacy is None else legacy
    m = sh_conversion(sh_order_from_ncoef(sh.shape[-1]), basis=basis, legacy=legacy, frame=frame,
                      affine=affine, to_basis=to_basis, to_legacy=to_legacy, to_frame=to_frame)
    if m is None:
        return np.asarray(sh, dtype=dtype)
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        if keep.shape != sh.shape[:-1]:
            raise ParameterError("mask", f"has shape {keep.shape}, the ODF grid is {sh.shape[:-1]}")
        out = np.zeros(sh.shape, dtype=dtype)
        out[keep] = convert_sh(sh[keep], basis=basis, frame=frame, affine=affine, legacy=legacy,
                               to_basis=to_basis, to_legacy=to_legacy, to_frame=to_frame, dtype=dtype)
        return out
    out = np.empty(sh.shape, dtype=dtype)
    flat_in = sh.reshape(-1, sh.shape[-1])
    flat_out = out.reshape(-1, sh.shape[-1])
    step = 1 << 16
    for i in range(0, len(flat_in), step):   # bounded temporary memory on large images
        flat_out[i:i + step] = flat_in[i:i + step].astype(np.float64) @ m
    return out
