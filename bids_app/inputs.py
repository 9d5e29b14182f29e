"""Load one DWI run and check it before any model is fitted.

Every problem a user can have with their files (gradient tables that do not
match the image, no b=0 volume, non-unit vectors, NaNs, a 3D image, a broken
affine) becomes an :class:`~bids_app.errors.InputDataError` naming the file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputDataError, IOFailure, NoInputError
from .gradients import fsl_to_voxel_bvecs

log = logging.getLogger(__name__)

B0_THRESHOLD = 50.0  # s/mm^2: volumes at or below are b=0
UNIT_TOLERANCE = 0.05  # |norm - 1| allowed for b>0 vectors (rounding in text files)


@dataclass
class DwiData:
    data: np.ndarray  # float32, 4D
    affine: np.ndarray
    header: nib.Nifti1Header
    bvals: np.ndarray
    bvecs: np.ndarray  # (N, 3) unit vectors in the scaled-voxel-axis frame; zero rows for b=0
    zooms: tuple

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= B0_THRESHOLD

    def gtab(self, keep: np.ndarray | None = None):
        from dipy.core.gradients import gradient_table
        sel = slice(None) if keep is None else keep
        bvecs = self.bvecs[sel].copy()
        bvals = self.bvals[sel]
        bvecs[bvals <= B0_THRESHOLD] = 0.0
        return gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)


def _read_table(path: Path, what: str) -> np.ndarray:
    try:
        arr = np.loadtxt(path, ndmin=2, dtype=float)
    except OSError as exc:
        _raise_if_io_error(path, exc)
        raise InputDataError(f"{path.name}: cannot read {what} as numbers ({exc})") from None
    except ValueError as exc:
        raise InputDataError(f"{path.name}: cannot read {what} as numbers ({exc})") from None
    return arr


def load_gradients(bval_path: Path, bvec_path: Path, n_volumes: int, affine: np.ndarray):
    """bvals (N,) and bvecs (N,3) in the scaled-voxel-axis frame, checked."""
    bvals = _read_table(bval_path, "b-values")
    bvecs = _read_table(bvec_path, "b-vectors")
    if bvals.shape[0] != 1 and bvals.shape[1] == 1:
        bvals = bvals.T
    if bvals.shape[0] != 1:
        raise InputDataError(f"{bval_path.name}: expected one row of b-values, found {bvals.shape[0]} rows")
    bvals = bvals[0]
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    if bvecs.shape[0] != 3:
        raise InputDataError(f"{bvec_path.name}: expected 3 rows of b-vectors, found shape {bvecs.shape}")
    if bvals.size != n_volumes:
        raise InputDataError(f"{bval_path.name} has {bvals.size} b-values but the image has {n_volumes} volumes")
    if bvecs.shape[1] != n_volumes:
        raise InputDataError(f"{bvec_path.name} has {bvecs.shape[1]} vectors but the image has {n_volumes} volumes")
    if not np.all(np.isfinite(bvals)) or not np.all(np.isfinite(bvecs)):
        raise InputDataError(f"{bval_path.name}/{bvec_path.name}: non-finite values in the gradient table")
    if np.any(bvals < 0):
        raise InputDataError(f"{bval_path.name}: negative b-values")
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise InputDataError(f"{bval_path.name}: no b=0 volume (b <= {B0_THRESHOLD:g}); "
                             "models need a non-diffusion-weighted reference")
    if b0.all():
        raise InputDataError(f"{bval_path.name}: every volume is b=0; no diffusion weighting")
    vecs = bvecs.T.copy()
    norms = np.linalg.norm(vecs[~b0], axis=1)
    bad = np.abs(norms - 1) > UNIT_TOLERANCE
    if bad.any():
        i = int(np.flatnonzero(~b0)[np.argmax(bad)])
        raise InputDataError(f"{bvec_path.name}: b-vector of volume {i} has norm {np.linalg.norm(vecs[i]):.3f}; "
                             "diffusion-weighted volumes need unit vectors")
    vecs[~b0] /= norms[:, None]
    vecs[b0] = 0.0
    return bvals, fsl_to_voxel_bvecs(vecs, affine)


# deflate cannot shrink data more than about 1032:1: a .nii.gz claiming more is not what it says
_MAX_DEFLATE_RATIO = 1032


def _gb(n: float) -> str:
    return f"{n / (1 << 30):.2f} GB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MB"


def check_image_size(path: Path, img, memory_limit: int | None = None) -> None:
    """Refuse, before anything is allocated, an image whose header claims more data than the file
    can hold, more than ``memory_limit`` bytes as float32, or values that are not real numbers."""
    path = Path(path)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind == "c":
        raise InputDataError(f"{path.name}: complex-valued data ({dtype}); tractoscale needs magnitude images")
    if dtype.kind not in "biuf":
        raise InputDataError(f"{path.name}: data type {dtype} is not a number per voxel (RGB or a compound type?)")
    n_voxels = int(np.prod(img.shape, dtype=np.uint64))
    claimed = n_voxels * dtype.itemsize
    size = path.stat().st_size
    shape = "x".join(str(d) for d in img.shape)
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    if path.name.endswith(".gz"):
        if claimed > size * _MAX_DEFLATE_RATIO:
            raise InputDataError(f"{path.name}: the header claims {shape} {dtype} voxels ({_gb(claimed)}) but "
                                 f"the {_gb(size)} compressed file cannot hold that much: the header is corrupt")
    elif offset + claimed > size:
        raise InputDataError(f"{path.name}: the header claims {shape} {dtype} voxels ({_gb(claimed)}) but the "
                             f"file holds {_gb(max(size - offset, 0))} of data: truncated file or corrupt header")
    need = n_voxels * 4      # the float32 copy every model reads
    if memory_limit is not None and need > memory_limit:
        raise InputDataError(f"{path.name}: {shape} voxels need {_gb(need)} of memory as float32, more than "
                             f"the {_gb(memory_limit)} available (--mem, the job's limit or the free memory)")


def _raise_if_io_error(path: Path, exc: Exception) -> None:
    """A file the system cannot read (permissions, a failing disk: an errno) is an I/O error (exit
    74), not bad data; nibabel's own complaints about the content carry no errno."""
    if isinstance(exc, OSError) and exc.errno is not None:
        raise IOFailure(f"cannot read {path}: {exc.strerror}") from None


def _read_problem(exc: Exception) -> str:
    """What went wrong reading image data, in words (some exceptions have no message)."""
    if isinstance(exc, EOFError) or ("Expected" in str(exc) and "bytes" in str(exc)):
        return "the file ends before the image data does (truncated or damaged)"
    if isinstance(exc, MemoryError):
        return "not enough memory"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_dwi(dwi_path: Path, bval_path: Path, bvec_path: Path, *, memory_limit: int | None = None) -> DwiData:
    """Load and check one DWI run; ``memory_limit``: bytes the float32 image may take."""
    dwi_path = Path(dwi_path)
    if not dwi_path.is_file():
        raise NoInputError(f"{dwi_path} does not exist")
    try:
        img = nib.load(str(dwi_path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        _raise_if_io_error(dwi_path, exc)
        raise InputDataError(f"{dwi_path.name}: cannot read as NIfTI ({_read_problem(exc)})") from None
    check_image_size(dwi_path, img, memory_limit)
    if img.ndim != 4:
        raise InputDataError(f"{dwi_path.name}: a DWI must be 4D (x, y, z, volumes); this image is {img.ndim}D")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputDataError(f"{dwi_path.name}: the image affine is not finite or not invertible")
    if img.shape[3] < 2:
        raise InputDataError(f"{dwi_path.name}: only {img.shape[3]} volume; need b=0 and diffusion-weighted volumes")
    bvals, bvecs = load_gradients(Path(bval_path), Path(bvec_path), img.shape[3], affine)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        _raise_if_io_error(dwi_path, exc)
        raise InputDataError(f"{dwi_path.name}: cannot read image data ({_read_problem(exc)})") from None
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise InputDataError(f"{dwi_path.name}: {n_bad} NaN/inf values in the image data")
    if not any(np.any(data[..., i] > 0) for i in np.flatnonzero(bvals <= B0_THRESHOLD)):
        raise InputDataError(f"{dwi_path.name}: no signal: the b=0 volumes hold no positive value "
                             "(an empty or blanked image)")
    if float(data.max()) == float(data.min()):
        raise InputDataError(f"{dwi_path.name}: no signal: every voxel of every volume holds "
                             f"{float(data.flat[0]):g}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return DwiData(data=data, affine=affine, header=img.header, bvals=bvals, bvecs=bvecs, zooms=zooms)


def load_mask(path: Path, shape, affine) -> np.ndarray:
    try:
        img = nib.load(str(path))
    except Exception as exc:
        _raise_if_io_error(Path(path), exc)
        raise InputDataError(f"{Path(path).name}: cannot read mask ({_read_problem(exc)})") from None
    check_image_size(path, img)
    if tuple(img.shape[:3]) != tuple(shape[:3]) or not np.allclose(img.affine, affine, atol=1e-3):
        raise InputDataError(f"{Path(path).name}: mask grid {img.shape[:3]} does not match the DWI grid {shape[:3]}")
    mask = np.asarray(img.dataobj) > 0
    if mask.ndim == 4:
        mask = mask[..., 0]
    if not mask.any():
        raise InputDataError(f"{Path(path).name}: the brain mask is empty")
    return mask


def compute_mask(dwi: DwiData) -> np.ndarray:
    """Brain mask by median Otsu on the mean b=0 (dipy)."""
    from dipy.segment.mask import median_otsu
    mean_b0 = dwi.data[..., dwi.b0_mask].mean(axis=-1)
    _, mask = median_otsu(mean_b0, median_radius=2, numpass=1)
    if not mask.any():
        raise InputDataError("automatic brain masking found no brain (is the b=0 image empty?)")
    return mask
