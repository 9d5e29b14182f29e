"""Score a tractogram of a demo subject against its ground truth (tests, benchmarks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .phantom import BUNDLES

NEAR_MM = 1.0    # steps this close to a true trajectory are compared with its direction


def score_against_truth(streamlines, bids_dir, label: str, session: str | None = None) -> dict:
    """:func:`score` of world-mm ``streamlines`` against the ground truth that ``demo-data`` wrote for
    subject ``label`` (its bundle masks and true trajectories under ``sourcedata/groundtruth``)."""
    import nibabel as nib
    from trx.trx_file_memmap import load

    ents = f"sub-{label}" + (f"_ses-{session}" if session else "")
    gt = Path(bids_dir) / "sourcedata" / "groundtruth" / f"sub-{label}" / (f"ses-{session}" if session else "")
    img = nib.load(str(gt / f"{ents}_desc-bundles_mask.nii.gz"))
    masks = np.asarray(img.dataobj) > 0                          # (X, Y, Z, bundles)
    t = load(str(gt / f"{ents}_tractogram.trx"))
    truth = [np.asarray(x, dtype=np.float64) for x in t.streamlines]
    t.close()
    return score(streamlines, {b: masks[..., k] for k, b in enumerate(BUNDLES)}, img.affine, truth)


def score(streamlines, masks: dict, affine, truth) -> dict:
    """Figures of world-mm ``streamlines`` given the true bundle ``masks`` ({name: (X, Y, Z) bool} on
    the grid of ``affine``) and the true trajectories ``truth`` (world mm):

    * ``inside_dilated``: fraction of the points in the union of the bundles dilated by one voxel
      (26-neighbourhood); ``inside``: the same without dilation;
    * ``coverage``: per bundle, the fraction of its voxels that a streamline point falls in;
    * ``members``: per bundle, the streamlines with more than half of their points in it;
    * ``angle``: the median angle (degrees) between the steps and the tangent of the nearest true
      trajectory, over the steps whose midpoint lies within ``NEAR_MM`` of one;
    * ``n``, ``median_length`` (mm).
    """
    from scipy.ndimage import binary_dilation

    names = list(masks)
    union = np.any([masks[b] for b in names], axis=0)
    sls = [np.asarray(s, dtype=np.float64) for s in streamlines]
    if not sls:
        return {"n": 0, "inside_dilated": 0.0, "inside": 0.0, "median_length": 0.0, "angle": float("nan"),
                "coverage": dict.fromkeys(names, 0.0), "members": dict.fromkeys(names, 0)}
    dilated = binary_dilation(union, np.ones((3, 3, 3), bool))
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    ijk = [np.clip(np.rint(s @ inv[:3, :3].T + inv[:3, 3]).astype(int), 0, np.array(union.shape) - 1) for s in sls]
    pts = tuple(np.concatenate(ijk).T)
    visited = np.zeros(union.shape, bool)
    visited[pts] = True
    coverage = {b: float((visited & masks[b]).sum() / max(masks[b].sum(), 1)) for b in names}
    members = {b: int(sum(masks[b][tuple(p.T)].mean() > 0.5 for p in ijk)) for b in names}
    lengths = [float(np.linalg.norm(np.diff(s, axis=0), axis=1).sum()) for s in sls]
    return {"n": len(sls), "inside_dilated": float(dilated[pts].mean()), "inside": float(union[pts].mean()),
            "coverage": coverage, "members": members, "median_length": float(np.median(lengths)),
            "angle": _angle_to_truth(sls, truth)}


def _angle_to_truth(sls, truth) -> float:
    from scipy.spatial import cKDTree

    truth = [np.asarray(x, dtype=np.float64) for x in truth if len(x) > 1]
    pts = np.concatenate(truth)
    tangents = np.concatenate([np.gradient(x, axis=0) for x in truth])
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    sls = [s for s in sls if len(s) > 1]
    steps = np.concatenate([np.diff(s, axis=0) for s in sls])
    mids = np.concatenate([0.5 * (s[1:] + s[:-1]) for s in sls])
    dist, idx = cKDTree(pts).query(mids)
    near = dist <= NEAR_MM
    if not near.any():
        return float("nan")
    unit = steps[near] / np.linalg.norm(steps[near], axis=1, keepdims=True)
    cos = np.abs((unit * tangents[idx[near]]).sum(1))
    return float(np.degrees(np.arccos(np.clip(np.median(cos), 0.0, 1.0))))
