"""Score a demo subject's tractogram against its ground-truth bundle masks (tests, benchmarks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .phantom import BUNDLES


def score_against_truth(streamlines, bids_dir, label: str, session: str | None = None) -> dict:
    """Figures of world-mm ``streamlines`` on demo subject ``label``:

    * ``inside_dilated``: fraction of the points in the union of the true bundles dilated by one voxel
      (26-neighbourhood), ``inside``: the same without dilation;
    * ``coverage``: per bundle, the fraction of its voxels that a streamline point falls in;
    * ``members``: per bundle, the streamlines with more than half of their points in it;
    * ``angle``: the median angle (degrees) between each step and the tangent of the nearest true
      trajectory, over the steps whose midpoint lies within ``NEAR_MM`` of one;
    * ``n``, ``median_length`` (mm).
    """
    import nibabel as nib
    from scipy.ndimage import binary_dilation

    ents = f"sub-{label}" + (f"_ses-{session}" if session else "")
    rel = Path(f"sub-{label}") / (f"ses-{session}" if session else "")
    img = nib.load(str(Path(bids_dir) / "sourcedata" / "groundtruth" / rel / f"{ents}_desc-bundles_mask.nii.gz"))
    masks = np.asarray(img.dataobj) > 0                          # (X, Y, Z, bundles)
    union = masks.any(-1)
    dilated = binary_dilation(union, np.ones((3, 3, 3), bool))
    inv = np.linalg.inv(img.affine)
    sls = [np.asarray(s, dtype=np.float64) for s in streamlines]
    if not sls:
        return {"n": 0, "inside_dilated": 0.0, "inside": 0.0, "median_length": 0.0,
                "coverage": dict.fromkeys(BUNDLES, 0.0), "members": dict.fromkeys(BUNDLES, 0)}
    ijk = [np.clip(np.rint(s @ inv[:3, :3].T + inv[:3, 3]).astype(int), 0, np.array(union.shape) - 1) for s in sls]
    pts = tuple(np.concatenate(ijk).T)
    visited = np.zeros(union.shape, bool)
    visited[pts] = True
    coverage = {b: float((visited & masks[..., k]).sum() / max(masks[..., k].sum(), 1)) for k, b in enumerate(BUNDLES)}
    members = {b: int(sum(masks[..., k][tuple(p.T)].mean() > 0.5 for p in ijk)) for k, b in enumerate(BUNDLES)}
    lengths = [float(np.linalg.norm(np.diff(s, axis=0), axis=1).sum()) for s in sls]
    return {"n": len(sls), "inside_dilated": float(dilated[pts].mean()), "inside": float(union[pts].mean()),
            "coverage": coverage, "members": members, "median_length": float(np.median(lengths)),
            "angle": _angle_to_truth(sls, Path(img.get_filename()).with_name(f"{ents}_tractogram.trx"))}


NEAR_MM = 1.0


def _angle_to_truth(sls, truth_path: Path) -> float:
    from scipy.spatial import cKDTree
    from trx.trx_file_memmap import load

    t = load(str(truth_path))
    truth = [np.asarray(x, dtype=np.float64) for x in t.streamlines]
    t.close()
    pts = np.concatenate(truth)
    tangents = np.concatenate([np.gradient(x, axis=0) for x in truth])
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    steps = np.concatenate([np.diff(s, axis=0) for s in sls])
    mids = np.concatenate([0.5 * (s[1:] + s[:-1]) for s in sls])
    dist, idx = cKDTree(pts).query(mids)
    near = dist <= NEAR_MM
    if not near.any():
        return float("nan")
    cos = np.abs((steps[near] / np.linalg.norm(steps[near], axis=1, keepdims=True) * tangents[idx[near]]).sum(1))
    return float(np.degrees(np.arccos(np.clip(np.median(cos), 0.0, 1.0))))
