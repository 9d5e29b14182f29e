"""Per-participant QC figure: mean b=0 with the brain mask, FA, colour-FA and
(when a tractogram exists) streamline density, in three orthogonal mid-slices."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from .derivatives import atomic_write

log = logging.getLogger(__name__)


def _mid_slices(vol: np.ndarray):
    x, y, z = (s // 2 for s in vol.shape[:3])
    return [np.rot90(vol[x]), np.rot90(vol[:, y]), np.rot90(vol[:, :, z])]


def streamline_density(tractogram: Path, shape, affine) -> np.ndarray | None:
    """Visits per voxel of the tractogram's points (None if it cannot be read)."""
    try:
        from .trx_reader import open_trx
        with open_trx(tractogram) as trx:
            pts = np.asarray(trx.streamlines.get_data(), dtype=np.float64)
    except Exception as exc:  # QC must never fail the run
        log.warning("QC: cannot read %s (%s)", tractogram, exc)
        return None
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), pts)).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(shape[:3])), axis=1)
    dens = np.zeros(shape[:3], np.float32)
    np.add.at(dens, tuple(ijk[ok].T), 1)
    return dens


def write_participant_qc(out, label: str) -> Path | None:
    """``sub-XX/figures/<name>_desc-qc_dwimap.png`` from the outputs on disk."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fa_img = nib.load(str(out.tensor("fa")))
        fa = np.asarray(fa_img.dataobj, dtype=np.float32)
        rgb = np.asarray(nib.load(str(out.tensor("rgb"))).dataobj, dtype=np.float32)
        b0 = np.asarray(nib.load(str(out.meanb0)).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(str(out.mask)).dataobj) > 0
    except (OSError, FileNotFoundError) as exc:
        log.warning("QC: outputs missing (%s)", exc)
        return None
    rows = [("mean b=0 + mask", b0, "gray"), ("FA", fa, "gray"), ("colour FA", rgb, None)]
    tract = out.tractogram if out.tracking else None
    if tract is not None and Path(tract).exists() and str(tract).endswith(".trx"):
        dens = streamline_density(tract, fa.shape, fa_img.affine)
        if dens is not None:
            rows.append(("streamline density (log)", np.log1p(dens), "inferno"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (title, vol, cmap) in enumerate(rows):
        vmax = np.percentile(vol[mask], 99.5) if vol.ndim == 3 and mask.any() else 1
        for c, sl in enumerate(_mid_slices(vol)):
            ax = axes[r, c]
            ax.imshow(sl if vol.ndim == 4 else sl, cmap=cmap, vmin=0, vmax=vmax if vol.ndim == 3 else None,
                      interpolation="nearest")
            if r == 0:
                ax.contour(_mid_slices(mask.astype(float))[c], levels=[0.5], colors="r", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title)
    fig.suptitle(f"{label}: tractoscale QC")
    fig.tight_layout()
    path = out.qc_figure
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
