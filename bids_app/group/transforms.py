"""Participant <-> common-space transforms written by the TBSS group step.

Conventions (all coordinates are RAS+ world millimetres):

* A transform is stored as a pair of **displacement fields**, each a 4D float32
  NIfTI ``(X, Y, Z, 3)`` on a voxel grid, holding for every voxel centre ``p`` of that
  grid the vector ``d(p)`` such that ``p + d(p)`` is the corresponding point in the
  *other* space.  Between voxel centres the displacement is interpolated trilinearly;
  beyond the grid it is held constant at the nearest edge value.
* ``sub-X_from-native_to-<space>_mode-image_xfm.nii.gz`` lives on the **common** grid:
  common point ``x`` -> native point ``x + d(x)``.  This is what resamples a native image
  into the common space (an image is pulled: every common voxel looks up its native
  location), hence "from native to <space>" in the ITK/fMRIPrep sense.
* ``sub-X_from-<space>_to-native_mode-image_xfm.nii.gz`` lives on the participant's
  **native** grid (the FA map's grid): native point ``y`` -> common point ``y + d(y)``.
  It resamples common-space images into native space, and it is the one that moves
  *points* (streamlines) from native space into the common space.

So :meth:`SubjectTransform.points_to_common` uses the second file and
:meth:`SubjectTransform.image_to_common` the first.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..derivatives import ENTITY_ORDER, RUN_ENTITIES, bids_name, run_label, save_nifti, sidecar_path
from ..errors import InputDataError, NoInputError

XFM_DIR = ("group", "tbss", "xfm")
# entities of a transform file name: the participant's, then from/to/mode
XFM_ENTITIES = RUN_ENTITIES   # a transform belongs to one DWI run


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", str(value))


def xfm_name(entities: dict, src: str, dst: str) -> str:
    """``sub-01[_ses-A]_from-<src>_to-<dst>_mode-image_xfm.nii.gz``."""
    ents = {k: entities[k] for k in XFM_ENTITIES if entities.get(k) not in (None, "")}
    return bids_name({**ents, "from": _label(src), "to": _label(dst), "mode": "image"}, "xfm", ".nii.gz")


def xfm_dir(output_dir: Path | str) -> Path:
    return Path(output_dir).joinpath(*XFM_DIR)


# ----------------------------------------------------------------------------------------------
# displacement fields

@dataclass
class DisplacementField:
    """``p -> p + d(p)`` with ``d`` sampled on a grid (``data`` (X,Y,Z,3) mm, ``affine``)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.data.shape[:3]

    @classmethod
    def identity(cls, shape, affine) -> "DisplacementField":
        return cls(np.zeros(tuple(shape[:3]) + (3,), np.float32), np.asarray(affine, float))

    @classmethod
    def from_function(cls, fn, shape, affine) -> "DisplacementField":
        """Tabulate a point map ``fn((n,3)) -> (n,3)`` on a grid."""
        pts = grid_points(shape, affine).reshape(-1, 3)
        disp = (np.asarray(fn(pts), float) - pts).reshape(tuple(shape[:3]) + (3,))
        return cls(disp.astype(np.float32), np.asarray(affine, float))

    def displacement(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, float).reshape(-1, 3)
        ijk = world_to_voxel(pts, self.affine)
        out = np.empty_like(pts)
        for k in range(3):
            out[:, k] = ndi.map_coordinates(self.data[..., k], ijk.T, order=1, mode="nearest")
        return out.reshape(np.shape(points))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, float)
        return pts + self.displacement(pts)

    def then(self, other: "DisplacementField") -> "DisplacementField":
        """On this grid: ``p -> other(self(p))``."""
        pts = grid_points(self.shape, self.affine)
        return DisplacementField((other(self(pts)) - pts).astype(np.float32), self.affine)

    def save(self, path: Path | str, sidecar: dict | None = None) -> Path:
        img_hdr = nib.Nifti1Header()
        img_hdr.set_intent("vector", (), name="displacement_mm")
        return save_nifti(self.data, self.affine, path, header=img_hdr, sidecar=sidecar)

    @classmethod
    def load(cls, path: Path | str) -> "DisplacementField":
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # nibabel raises many kinds for a damaged file
            raise InputDataError(f"cannot read transform {path}: {exc}") from None
        if data.ndim == 5 and data.shape[3] == 1:
            data = data[:, :, :, 0, :]
        if data.ndim != 4 or data.shape[3] != 3:
            raise InputDataError(f"{path} is not a displacement field (shape {data.shape})")
        return cls(data, img.affine.astype(float))


def grid_points(shape, affine) -> np.ndarray:
    """(X, Y, Z, 3) world mm of the voxel centres of a grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in tuple(shape)[:3]], indexing="ij"), -1)
    aff = np.asarray(affine, float)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(np.asarray(affine, float))
    return np.asarray(points, float) @ inv[:3, :3].T + inv[:3, 3]


def sample_image(data: np.ndarray, affine: np.ndarray, points: np.ndarray, *, order: int = 1,
                 cval: float = 0.0) -> np.ndarray:
    """Values of a 3D (or 4D, per volume) image at world points (..., 3).

    Points within half a voxel of the grid take the edge value; points further out get ``cval``.
    """
    data = np.asarray(data)
    pts = np.asarray(points, float)
    ijk = world_to_voxel(pts.reshape(-1, 3), affine)
    shape = np.array(data.shape[:3])
    outside = np.any((ijk < -0.5) | (ijk > shape - 0.5), axis=1)
    ijk = np.clip(ijk, 0, shape - 1)
    vols = data[..., None] if data.ndim == 3 else data
    out = np.empty((ijk.shape[0], vols.shape[3]), dtype=np.float64)
    for v in range(vols.shape[3]):
        out[:, v] = ndi.map_coordinates(np.asarray(vols[..., v], np.float64), ijk.T, order=order, mode="nearest")
    out[outside] = cval
    out = out.reshape(pts.shape[:-1] + (vols.shape[3],))
    return out[..., 0] if data.ndim == 3 else out


# ----------------------------------------------------------------------------------------------
# participant transform

@dataclass
class SubjectTransform:
    """A participant's mapping between native space and the common (group) space.

    ``to_native`` lives on the common grid (common point -> native point);
    ``to_common`` lives on the native grid (native point -> common point).
    """

    entities: dict
    space: str
    to_native: DisplacementField
    to_common: DisplacementField

    @property
    def common_shape(self) -> tuple:
        return self.to_native.shape

    @property
    def common_affine(self) -> np.ndarray:
        return self.to_native.affine

    def points_to_common(self, points: np.ndarray) -> np.ndarray:
        """Native world mm (n, 3) -> common-space world mm (n, 3)."""
        return self.to_common(np.asarray(points, float))

    def points_to_native(self, points: np.ndarray) -> np.ndarray:
        """Common-space world mm (n, 3) -> native world mm (n, 3)."""
        return self.to_native(np.asarray(points, float))

    def image_to_common(self, array: np.ndarray, native_affine: np.ndarray, *, order: int = 1,
                        cval: float = 0.0) -> np.ndarray:
        """Resample a native image (3D, or 4D per volume) onto the common grid."""
        return sample_image(array, native_affine, self._common_grid_in_native, order=order,
                            cval=cval).astype(np.float32)

    @cached_property
    def _common_grid_in_native(self) -> np.ndarray:
        """Native world mm of every common-grid voxel (computed once; FA, MD, AD, RD reuse it)."""
        return self.to_native(grid_points(self.common_shape, self.common_affine))

    def image_to_native(self, array: np.ndarray, *, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Resample a common-space image onto the participant's native grid."""
        where = self.to_common(grid_points(self.to_common.shape, self.to_common.affine))
        return sample_image(array, self.common_affine, where, order=order, cval=cval).astype(np.float32)

    def save(self, output_dir: Path | str, sidecar: dict | None = None) -> tuple[Path, Path]:
        d = xfm_dir(output_dir)
        meta = dict(sidecar or {})
        pull = d / xfm_name(self.entities, "native", self.space)
        push = d / xfm_name(self.entities, self.space, "native")
        base = {"Space": self.space, "Units": "mm", "CoordinateSystem": "RAS+ world",
                "Type": "displacement field"}
        self.to_native.save(pull, {**base, **meta, "Description":
                                   "On the common grid: common point p maps to native point p + d(p) "
                                   "(resamples native images into the common space)."})
        # written last: its presence marks a complete pair
        self.to_common.save(push, {**base, **meta, "Description":
                                   "On the native grid: native point p maps to common point p + d(p) "
                                   "(moves native points, e.g. streamlines, into the common space)."})
        return pull, push


def transform_paths(output_dir: Path | str, entities: dict, space: str) -> tuple[Path, Path]:
    d = xfm_dir(output_dir)
    return d / xfm_name(entities, "native", space), d / xfm_name(entities, space, "native")


def available_spaces(output_dir: Path | str, entities: dict) -> list[str]:
    """Common spaces with a saved transform for these entities."""
    prefix = run_label(entities) + "_from-native_to-"
    return sorted(p.name[len(prefix):].split("_")[0]
                  for p in xfm_dir(output_dir).glob(prefix + "*_mode-image_xfm.nii.gz"))


def load_transform(output_dir: Path | str, entities: dict, space: str | None = None) -> SubjectTransform:
    """Load a participant's saved registration (``entities``: short keys sub, ses, ...).

    ``space`` defaults to the only common space saved for this participant.
    """
    ents = {k: v for k, v in entities.items() if k in XFM_ENTITIES and v not in (None, "")}
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    if space is None:
        spaces = available_spaces(output_dir, ents)
        if not spaces:
            raise NoInputError(f"no group-level transform for {run_label(ents)} in "
                               f"{xfm_dir(output_dir)}: run the TBSS group step first")
        if len(spaces) > 1:
            raise InputDataError(f"several common spaces saved ({', '.join(spaces)}): pass space=")
        space = spaces[0]
    pull, push = transform_paths(output_dir, ents, space)
    for p in (pull, push):
        if not p.exists():
            raise NoInputError(f"missing transform {p}: run the TBSS group step first")
    return SubjectTransform(ents, space, DisplacementField.load(pull), DisplacementField.load(push))


def read_transform_sidecar(path: Path | str) -> dict:
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
