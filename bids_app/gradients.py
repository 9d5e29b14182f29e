"""Gradient-direction conventions: FSL/BIDS ``.bvec`` <-> the image's voxel-axis frame <-> world.

The frames (voxel, world, FSL) are defined in :mod:`kernels.frames`; model fits (DTI, SH) run in the
scaled-voxel-axis frame, and BIDS ``.bvec`` files hold the FSL convention (the voxel frame with x
negated when ``det(affine[:3, :3]) > 0``; MRtrix3 does the same).

All functions take and return ``(N, 3)`` arrays (one row per volume); b0 rows (all zeros) stay zero.
"""
from __future__ import annotations

import numpy as np

from kernels.frames import fsl_flips_x, voxel_frame

__all__ = [
    "voxel_frame", "fsl_flips_x", "voxel_to_fsl_bvecs", "fsl_to_voxel_bvecs",
    "voxel_to_world_dirs", "world_to_voxel_dirs", "read_bvals_bvecs", "write_bvals_bvecs",
]


def _as_rows(vecs) -> np.ndarray:
    v = np.array(vecs, dtype=np.float64, copy=True)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected an (N, 3) array of directions, got shape {v.shape}")
    return v


def voxel_to_fsl_bvecs(bvecs_voxel, affine) -> np.ndarray:
    """Voxel-frame unit vectors -> the vectors to write in a BIDS/FSL ``.bvec`` file."""
    v = _as_rows(bvecs_voxel)
    if fsl_flips_x(affine):
        v[:, 0] = -v[:, 0]
    return v + 0.0  # turn -0.0 into 0.0


def fsl_to_voxel_bvecs(bvecs_fsl, affine) -> np.ndarray:
    """Vectors read from a BIDS/FSL ``.bvec`` file -> voxel-frame vectors (inverse of the above)."""
    return voxel_to_fsl_bvecs(bvecs_fsl, affine)


def voxel_to_world_dirs(dirs_voxel, affine) -> np.ndarray:
    """Directions in the voxel frame -> world (RAS+) directions."""
    return _as_rows(dirs_voxel) @ voxel_frame(affine).T


def world_to_voxel_dirs(dirs_world, affine) -> np.ndarray:
    """World (RAS+) directions -> directions in the voxel frame."""
    return _as_rows(dirs_world) @ voxel_frame(affine)


def read_bvals_bvecs(bval_path, bvec_path) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL-style files: bvals (N,), bvecs (N, 3) exactly as stored (FSL convention)."""
    bvals = np.loadtxt(bval_path, dtype=np.float64, ndmin=1).ravel()
    bvecs = np.loadtxt(bvec_path, dtype=np.float64, ndmin=2)
    if bvecs.shape[0] == 3 and bvecs.shape[1] == bvals.size:
        bvecs = bvecs.T
    elif bvecs.shape != (bvals.size, 3):
        raise ValueError(f"bvec shape {bvecs.shape} does not match {bvals.size} bvals")
    return bvals, bvecs


def write_bvals_bvecs(bval_path, bvec_path, bvals, bvecs_fsl) -> None:
    """Write FSL-style files (bvecs given as (N, 3), stored as 3 rows).  Plain writes: wrap the
    paths with :func:`bids_app.derivatives.atomic_write` when writing into an output folder."""
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = _as_rows(bvecs_fsl)
    with open(bval_path, "w") as f:
        f.write(" ".join(_fmt_b(b) for b in bvals) + "\n")
    with open(bvec_path, "w") as f:
        for row in bvecs.T:
            f.write(" ".join(f"{x:.6f}" for x in row + 0.0) + "\n")


def _fmt_b(b: float) -> str:
    return str(int(round(b))) if abs(b - round(b)) < 1e-6 else f"{b:.3f}"
