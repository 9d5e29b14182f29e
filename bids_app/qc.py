"""Per-participant QC figure: mean b=0 with the brain mask, FA, colour-FA and
(when a tractogram exists) streamline density, in three orthogonal mid-slices, then the notes a
reviewer must see: the gradient check's verdict and scores, and every downgrade of a fit."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np

from .derivatives import atomic_write, sidecar_path

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
    if pts.size == 0:
        return np.zeros(shape[:3], np.float32)
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), pts)).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(shape[:3])), axis=1)
    dens = np.zeros(shape[:3], np.float32)
    np.add.at(dens, tuple(ijk[ok].T), 1)
    return dens


def _meta(path: Path) -> dict:
    import json
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}


def qc_notes(out) -> list[str]:
    """The lines under the QC images: gradient check, downgrades, tractogram problems."""
    lines = []
    fa_meta = _meta(out.tensor("fa"))
    check = fa_meta.get("GradientCheck")
    if check:
        scores = check.get("MeanStreamlineLength", {})
        top = ", ".join(f"{k}: {v:.1f}" for k, v in list(scores.items())[:3])
        verdict = ("table as given" if check.get("Best") == "x y z" else
                   f"SUSPICIOUS, best '{check.get('Best')}', applied '{check.get('Applied')}'")
        lines.append(f"gradient check ({check.get('Mode')}): {verdict}; mean length (mm) {top}, "
                     f"as given {scores.get('x y z', float('nan')):.1f}")
    else:
        lines.append("gradient check: off")
    for what, meta in (("DTI", fa_meta), ("ODF", _meta(out.sh) if getattr(out, "odf_model", None) else {})):
        for note in meta.get("Downgrades", []):
            lines.append(f"WARNING {what}: {note}")
    tract = out.tractogram if getattr(out, "tracking", None) else None
    if tract is not None and Path(tract).exists():
        n = _meta(tract).get("NumberOfStreamlines")
        if n == 0:
            lines.append("WARNING tractography: the tractogram is empty (no streamline passed the criteria)")
    return lines


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
    text = "\n".join(textwrap.fill(line, 100, subsequent_indent="    ") for line in qc_notes(out))
    text_h = 0.15 * (text.count("\n") + 1) + 0.2          # inches under the images
    height = 3 * len(rows) + text_h
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, height), squeeze=False)
    fig.text(0.01, text_h / height - 0.02 / height, text, va="top", ha="left", fontsize=7, family="monospace",
             color="darkred" if "WARNING" in text or "SUSPICIOUS" in text else "black")
    for r, (title, vol, cmap) in enumerate(rows):
        vmax = float(np.percentile(vol[mask], 99.5)) if vol.ndim == 3 and mask.any() else 1.0
        vmax = vmax if vmax > 0 else 1.0
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
    fig.tight_layout(rect=(0, text_h / height, 1, 1))
    path = out.qc_figure
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
