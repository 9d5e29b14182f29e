"""WM/GM/CSF probability maps on the DWI grid, for anatomical stopping (ACT, CMC).

Preferred: maps shipped with ``--input-derivatives`` on the DWI grid
(``sub-X[_ses-Y]_label-{WM,GM,CSF}_probseg.nii.gz`` in the dwi folder).
Otherwise a DTI-based approximation: free water (CSF) where MD is high,
white matter where FA is high, gray matter for the rest of the brain.
"""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

log = logging.getLogger(__name__)

CSF_MD = 1.6e-3  # mm^2/s: MD midpoint between tissue (~0.8e-3) and free water (3e-3)
CSF_MD_WIDTH = 0.2e-3
WM_FA = 0.25  # FA midpoint of the WM/GM transition
WM_FA_WIDTH = 0.05


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def dti_tissue_maps(fa: np.ndarray, md: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Fuzzy WM/GM/CSF from FA and MD; the three sum to 1 inside the mask, 0 outside."""
    with np.errstate(over="ignore"):
        csf = _sigmoid((md - CSF_MD) / CSF_MD_WIDTH)
        wm = (1 - csf) * _sigmoid((fa - WM_FA) / WM_FA_WIDTH)
    gm = 1 - csf - wm
    out = {}
    for k, v in (("WM", wm), ("GM", gm), ("CSF", csf)):
        v = np.where(mask, v, 0).astype(np.float32)
        out[k] = v
    return out


def tissue_map_files(dwi_path: Path) -> dict[str, Path] | None:
    """``label-{WM,GM,CSF}_probseg`` files beside a (preprocessed) DWI, or None if one is missing."""
    name = Path(dwi_path).name
    stem = name.split("_desc-")[0] if "_desc-" in name else name.rsplit("_dwi", 1)[0]
    files = {}
    for label in ("WM", "GM", "CSF"):
        cands = sorted(Path(dwi_path).parent.glob(f"{stem}*_label-{label}_probseg.nii*"))
        if not cands:
            return None
        files[label] = cands[0]
    return files


def load_tissue_maps(files: dict[str, Path] | None, shape, affine) -> dict[str, np.ndarray] | None:
    """The maps of :func:`tissue_map_files` when they are on the DWI grid, else None."""
    if not files:
        return None
    maps = {}
    for label, path in files.items():
        img = nib.load(str(path))
        if tuple(img.shape[:3]) != tuple(shape[:3]) or not np.allclose(img.affine, affine, atol=1e-3):
            log.info("%s is not on the DWI grid; using DTI-based tissue maps", path.name)
            return None
        maps[label] = np.asarray(img.dataobj, dtype=np.float32)
    return maps
