"""Evaluation on real bundles: DIPY's ``minimal_bundles.zip`` (AF_L, CST_R, CC_ForcepsMajor of 5
subjects, 50 streamlines of 20 points each per bundle, shipped inside the dipy package).

Each subject's bundles are in that subject's own scanner space: ``.trk`` files with an identity
voxel-to-RAS matrix and 1 mm voxels, i.e. RAS+ mm; the bundles' centres differ between subjects
by up to ~50 mm (sub_3 sits ~40 mm higher than sub_1), while their positions relative to each
other agree within a few mm, so the subjects are not in a common (e.g. MNI) space.
Leave-one-subject-out therefore aligns the subjects first, without labels: the atlas subjects
onto the first of them, then the held-out subject onto the pooled atlas (:mod:`.align`).
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from .align import apply_affine, register_tractograms
from .atlas import Atlas
from .ot import OTParams
from .segment import segment

BUNDLES = ("AF_L", "CST_R", "CC_ForcepsMajor")


def minimal_bundles_path() -> Path:
    import dipy
    return Path(os.path.dirname(dipy.__file__)) / "data" / "files" / "minimal_bundles.zip"


def load_minimal_bundles(path: Path | None = None) -> dict:
    """``{subject: {bundle: [(20, 3) arrays]}}`` read straight from the zip (no extraction)."""
    import nibabel as nib

    path = Path(path or minimal_bundles_path())
    out: dict = {}
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".trk"):
                continue
            sub, fname = name.split("/")[-2:]
            trk = nib.streamlines.load(io.BytesIO(z.read(name)))
            out.setdefault(sub, {})[fname[:-4]] = [np.asarray(s, np.float64) for s in trk.streamlines]
    return out


def _flatten(bundles: dict, names=BUNDLES):
    sl, lab = [], []
    for k, b in enumerate(names):
        sl += bundles[b]
        lab += [k] * len(bundles[b])
    return sl, np.asarray(lab, np.int64)


def align_to(data: dict, reference: str) -> dict:
    """Label-free affine of every subject's whole tractogram onto ``reference``'s: ``{sub: 4x4}``."""
    ref, _ = _flatten(data[reference])
    return {s: (np.eye(4) if s == reference else register_tractograms(_flatten(data[s])[0], ref))
            for s in sorted(data)}


def leave_one_out(data: dict, test: str, method: str = "ot", params: OTParams | None = None,
                  align: bool = True, fragments: bool = True, backend=None,
                  transforms: dict | None = None) -> dict:
    """Label subject ``test`` with an atlas made of the other subjects; returns accuracy etc.

    Alignment (``align``), without labels: the atlas subjects onto the first of them, then the
    held-out subject onto the pooled atlas -- or, with ``transforms`` (from :func:`align_to`),
    every subject by its given matrix.
    """
    others = [s for s in sorted(data) if s != test]
    ref_sl, _ = _flatten(data[others[0]])
    atlas_bundles = {b: [] for b in BUNDLES}
    for s in others:
        if transforms is not None:
            T = transforms[s]
        else:
            T = (register_tractograms(_flatten(data[s])[0], ref_sl) if (align and s != others[0])
                 else np.eye(4))
        for b in BUNDLES:
            atlas_bundles[b] += [apply_affine(T, f) for f in data[s][b]]
    atlas = Atlas.from_streamlines(atlas_bundles)
    if fragments:
        atlas = atlas.with_fragments()
    sl, truth = _flatten(data[test])
    if transforms is not None:
        sl = [apply_affine(transforms[test], f) for f in sl]
    elif align:
        T = register_tractograms(sl, atlas.fibres())
        sl = [apply_affine(T, f) for f in sl]
    seg = segment(sl, atlas, method, params, backend)
    # atlas names are in BUNDLES order (from_streamlines keeps the dict order)
    return {"subject": test, "method": method, "accuracy": float(np.mean(seg.labels == truth)),
            "outliers": float(np.mean(seg.labels < 0)), "labels": seg.labels, "truth": truth}
