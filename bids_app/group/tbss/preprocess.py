"""FA preprocessing before registration (REFERENCE 6.1) and image loading for tasks."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ...errors import InputDataError


def preprocess_fa(fa: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] (NaN -> 0), erode the non-zero region once with a 3x3x3 box,
    and zero the first and last slice along every axis."""
    a = np.nan_to_num(np.asarray(fa, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    a = np.clip(a, 0.0, 1.0)
    keep = ndi.binary_erosion(a > 0, structure=np.ones((3, 3, 3), bool), border_value=0)
    a = np.where(keep, a, 0.0).astype(np.float32)
    for axis in range(3):
        idx = [slice(None)] * 3
        for end in (0, -1):
            idx[axis] = end
            a[tuple(idx)] = 0.0
    return a


def load_image(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Load a registration input: ``{"path": ..., "kind": "fa"|"template"|"plain"}``.

    ``fa`` images are preprocessed; ``template`` images (e.g. a WM probability map) are
    clamped to [0, 1]; ``plain`` images are used as they are.
    """
    path = Path(spec["path"])
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputDataError(f"cannot read {path}: {exc}") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise InputDataError(f"{path} is not a 3D image (shape {data.shape})")
    kind = spec.get("kind", "fa")
    if kind == "fa":
        data = preprocess_fa(data)
        if not data.any():
            raise InputDataError(f"{path}: no FA > 0 left after the TBSS erosion (is it an FA map?)")
    elif kind == "template":
        data = np.clip(np.nan_to_num(data), 0.0, 1.0).astype(np.float32)
    return data, img.affine.astype(float)
