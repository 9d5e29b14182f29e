"""Load one DWI run and check it before any model is fitted.

Every problem a user can have with their files (gradient tables that do not
match the image, no b=0 volume, non-unit vectors, NaNs, a 3D image, a broken
affine) becomes an :class:`~bids_app.errors.InputDataError` naming the file.
"""
from __future__ import annotations

import dataclasses
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
    """One DWI run held compactly: the signal of the voxels in ``mask`` only, one row per voxel.

    A brain holds about a quarter of its image's voxels, so this is a quarter of the memory of the
    4D image (the model fits read the signal of mask voxels only).  ``mean_b0`` covers the grid.
    """

    signal: np.ndarray  # (n, N) float32: the N volumes of the n voxels of ``mask`` (C order of the grid)
    mask: np.ndarray  # bool (X, Y, Z): the voxels held
    mean_b0: np.ndarray  # float32 (X, Y, Z): mean of the b=0 volumes, whole grid
    affine: np.ndarray
    header: nib.Nifti1Header
    bvals: np.ndarray
    bvecs: np.ndarray  # (N, 3) unit vectors in the scaled-voxel-axis frame; zero rows for b=0
    zooms: tuple

    @property
    def shape(self) -> tuple:
        return tuple(self.mask.shape)

    @property
    def n_volumes(self) -> int:
        return int(self.signal.shape[1])

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= B0_THRESHOLD

    @property
    def nbytes(self) -> int:
        return int(self.signal.nbytes)

    def gtab(self, keep: np.ndarray | None = None):
        from dipy.core.gradients import gradient_table
        sel = slice(None) if keep is None else keep
        bvecs = self.bvecs[sel].copy()
        bvals = self.bvals[sel]
        bvecs[bvals <= B0_THRESHOLD] = 0.0
        return gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)

    def rows(self, voxels: np.ndarray) -> np.ndarray:
        """Row numbers in ``signal`` of the voxels of a boolean grid ``voxels`` (a subset of ``mask``)."""
        voxels = np.asarray(voxels, dtype=bool)
        if np.any(voxels & ~self.mask):
            raise ValueError("voxels outside the DWI's loaded mask")
        index = np.cumsum(self.mask.ravel()) - 1
        return index[voxels.ravel()]

    def grid(self, values: np.ndarray, fill=0, dtype=np.float32) -> np.ndarray:
        """Per-voxel ``values`` ((n,) or (n, K), rows of ``signal``) scattered onto the grid."""
        out = np.full(self.shape + values.shape[1:], fill, dtype=dtype)
        out[self.mask] = values
        return out

    @property
    def data(self) -> np.ndarray:
        """The 4D float32 image (zero outside ``mask``); for small images and tests."""
        return self.grid(self.signal)

    @classmethod
    def from_array(cls, data: np.ndarray, affine, bvals, bvecs, mask: np.ndarray | None = None) -> "DwiData":
        """A 4D array already in memory (simulations, evaluations), holding the voxels of ``mask``
        (default: all); ``bvecs`` in the scaled-voxel-axis frame."""
        data = np.asarray(data, dtype=np.float32)
        keep = np.ones(data.shape[:3], bool) if mask is None else np.asarray(mask, dtype=bool)
        bvals = np.asarray(bvals, dtype=float)
        b0 = bvals <= B0_THRESHOLD
        mean_b0 = data[..., b0].mean(axis=-1) if b0.any() else np.zeros(data.shape[:3], np.float32)
        affine = np.asarray(affine, dtype=float)
        return cls(signal=data[keep], mask=keep, mean_b0=mean_b0.astype(np.float32), affine=affine,
                   header=nib.Nifti1Header(), bvals=bvals, bvecs=np.asarray(bvecs, dtype=float),
                   zooms=tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)))

    def with_bvecs(self, bvecs: np.ndarray) -> "DwiData":
        """The same signal with another gradient table (a corrected one)."""
        return dataclasses.replace(self, bvecs=np.asarray(bvecs, dtype=np.float64))


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
    if memory_limit is not None:
        check_memory(path, n_voxels, memory_limit)


def check_memory(path: Path, n_values: int, memory_limit: int) -> None:
    """Refuse to hold ``n_values`` float32 values when they exceed ``memory_limit`` bytes."""
    need = int(n_values) * 4
    if need > memory_limit:
        raise InputDataError(f"{Path(path).name}: {need // 4} values need {_gb(need)} of memory as float32, more "
                             f"than the {_gb(memory_limit)} available (--mem, the job's limit or the free memory)")


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


def _volumes(img, path: Path, wanted=None):
    """Yield ``(index, float32 volume)`` for the volumes of a 4D NIfTI in file order, reading the
    file once from start to end (a compressed file is never re-read from its start for each volume,
    and only one volume is in memory at a time).  ``wanted``: indices to yield (default: all);
    reading stops after the last one."""
    shape = tuple(int(s) for s in img.shape[:3])
    n = int(img.shape[3])
    wanted = range(n) if wanted is None else sorted(int(i) for i in wanted)
    last = max(wanted, default=-1)
    want = set(wanted)
    hdr = img.header
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or img.dataobj.order != "F":
        for i in wanted:  # other formats: nibabel's own slicing
            yield i, np.asarray(img.dataobj[..., i], dtype=np.float32)
        return
    dtype = hdr.get_data_dtype()
    slope, inter = hdr.get_slope_inter()
    nbytes = int(np.prod(shape)) * dtype.itemsize
    with nib.openers.ImageOpener(str(path)) as f:
        f.seek(int(img.dataobj.offset))
        for i in range(last + 1):
            buf = f.read(nbytes)
            if len(buf) != nbytes:
                raise InputDataError(f"{Path(path).name}: the file ends before volume {i} (truncated?)")
            if i not in want:
                continue
            vol = np.frombuffer(buf, dtype=dtype).reshape(shape, order="F").astype(np.float32)
            if slope is not None and slope not in (0, 1):
                vol *= np.float32(slope)
            if inter is not None and inter != 0:
                vol += np.float32(inter)
            yield i, vol


def load_dwi(dwi_path: Path, bval_path: Path, bvec_path: Path, mask=None, *,
             memory_limit: int | None = None) -> DwiData:
    """Load and check one DWI run, keeping the signal of the voxels of ``mask`` only.

    ``mask``: a boolean grid, ``"auto"`` (median Otsu on the mean b=0, :func:`compute_mask`) or
    None (every voxel).  The file is read volume by volume (twice with ``"auto"``: the b=0 volumes
    first), so the peak memory is the kept signal plus one volume; ``memory_limit``: bytes the kept
    signal may take (checked before it is allocated).
    """
    dwi_path = Path(dwi_path)
    if not dwi_path.is_file():
        raise NoInputError(f"{dwi_path} does not exist")
    try:
        img = nib.load(str(dwi_path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        _raise_if_io_error(dwi_path, exc)
        raise InputDataError(f"{dwi_path.name}: cannot read as NIfTI ({_read_problem(exc)})") from None
    check_image_size(dwi_path, img)
    if img.ndim != 4:
        raise InputDataError(f"{dwi_path.name}: a DWI must be 4D (x, y, z, volumes); this image is {img.ndim}D")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputDataError(f"{dwi_path.name}: the image affine is not finite or not invertible")
    if img.shape[3] < 2:
        raise InputDataError(f"{dwi_path.name}: only {img.shape[3]} volume; need b=0 and diffusion-weighted volumes")
    bvals, bvecs = load_gradients(Path(bval_path), Path(bvec_path), img.shape[3], affine)
    shape = tuple(int(s) for s in img.shape[:3])
    b0 = np.flatnonzero(bvals <= B0_THRESHOLD)

    def read(wanted=None):
        try:
            for i, vol in _volumes(img, dwi_path, wanted):
                n_bad = int(np.count_nonzero(~np.isfinite(vol)))
                if n_bad:
                    raise InputDataError(f"{dwi_path.name}: {n_bad} NaN/inf values in volume {i}")
                yield i, vol
        except InputDataError:
            raise
        except Exception as exc:   # OSError, EOFError, zlib errors...
            _raise_if_io_error(dwi_path, exc)
            raise InputDataError(f"{dwi_path.name}: cannot read image data ({_read_problem(exc)})") from None

    mean_b0 = np.zeros(shape, np.float32)
    if isinstance(mask, str) and mask == "auto":
        for _, vol in read(b0):
            mean_b0 += vol
        mean_b0 /= len(b0)
        mask = compute_mask(mean_b0)
        b0_done = True
    else:
        b0_done = False
    keep = np.ones(shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != shape:
        raise ValueError(f"mask shape {keep.shape} != image {shape}")
    if memory_limit is not None:
        check_memory(dwi_path, int(keep.sum()) * img.shape[3], memory_limit)
    signal = np.empty((int(keep.sum()), img.shape[3]), dtype=np.float32)
    for i, vol in read():
        signal[:, i] = vol[keep]
        if not b0_done and bvals[i] <= B0_THRESHOLD:
            mean_b0 += vol
    if not b0_done:
        mean_b0 /= len(b0)
    if not np.any(mean_b0 > 0):
        raise InputDataError(f"{dwi_path.name}: no signal: the b=0 volumes hold no positive value "
                             "(an empty or blanked image)")
    if signal.size and float(signal.max()) == float(signal.min()):
        raise InputDataError(f"{dwi_path.name}: no signal: every kept voxel of every volume holds "
                             f"{float(signal.flat[0]):g}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return DwiData(signal=signal, mask=keep, mean_b0=mean_b0, affine=affine, header=img.header, bvals=bvals,
                   bvecs=bvecs, zooms=zooms)


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


def compute_mask(mean_b0: np.ndarray) -> np.ndarray:
    """Brain mask by median Otsu on the mean b=0 (dipy)."""
    from dipy.segment.mask import median_otsu
    _, mask = median_otsu(np.asarray(mean_b0, dtype=np.float32), median_radius=2, numpass=1)
    if not mask.any():
        raise InputDataError("automatic brain masking found no brain (is the b=0 image empty?)")
    return mask
