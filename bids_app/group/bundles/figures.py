"""Figures (matplotlib, Agg): tract profiles per bundle, and a participant's bundles."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...derivatives import TENSOR_SCALARS, atomic_write

SCALARS = TENSOR_SCALARS


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    return path


def plot_profiles(table, tract: str, path: Path, groups: dict | None = None, scalars=SCALARS) -> Path:
    """Every participant's profile (thin) and the mean (thick) per group, one panel per scalar.

    ``table``: rows of the group profile table for this tract; ``groups``: ``{subject: group}``.
    """
    plt = _plt()
    scalars = [s for s in scalars if s in table.columns]
    fig, axes = plt.subplots(1, max(1, len(scalars)), figsize=(4.2 * max(1, len(scalars)), 3.4),
                             squeeze=False)
    groups = groups or {}
    keys = table[["subject", "session"]].fillna("").astype(str).drop_duplicates().values.tolist()
    names = sorted({groups.get(s, "all") for s, _ in keys})
    colours = {g: plt.cm.tab10(k % 10) for k, g in enumerate(names)}
    for ax, sc in zip(axes[0], scalars):
        curves = {g: [] for g in names}
        for sub, ses in keys:
            rows = table[(table["subject"].astype(str) == sub)
                         & (table["session"].fillna("").astype(str) == ses)].sort_values("node")
            g = groups.get(sub, "all")
            ax.plot(rows["node"], rows[sc], color=colours[g], lw=0.7, alpha=0.5)
            curves[g].append(rows[sc].to_numpy(float))
        for g, cs in curves.items():
            if not cs or len({len(c) for c in cs}) != 1:
                continue
            mean = np.nanmean(np.vstack(cs), axis=0)
            ax.plot(np.arange(len(mean)), mean, color=colours[g], lw=2.5,
                    label=f"{g} mean (n={len(cs)})")
        ax.set_title(f"{tract}: {sc.upper()}")
        ax.set_xlabel("node")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_bundles(points: np.ndarray, labels: np.ndarray, names, path: Path, title: str = "") -> Path:
    """Three orthogonal projections of fibres ((n, k, 3) mm) coloured by bundle (-1 grey)."""
    plt = _plt()
    from matplotlib.collections import LineCollection

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    views = (("sagittal", 1, 2, "y (mm)", "z (mm)"), ("coronal", 0, 2, "x (mm)", "z (mm)"),
             ("axial", 0, 1, "x (mm)", "y (mm)"))
    cmap = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
    n_col = 10 if len(names) <= 10 else 20
    handles = []
    for ax, (vname, a, b, xl, yl) in zip(axes, views):
        for k in [-1] + list(range(len(names))):
            sel = labels == k
            if not sel.any():
                continue
            colour = (0.75, 0.75, 0.75, 0.4) if k < 0 else cmap(k % n_col)
            lc = LineCollection(points[sel][:, :, [a, b]], colors=[colour], linewidths=0.5,
                                alpha=0.35 if k < 0 else 0.8)
            ax.add_collection(lc)
            if vname == "sagittal":
                handles.append(plt.Line2D([], [], color=colour, lw=2,
                                          label="outlier" if k < 0 else str(names[k])))
        if len(points):
            ax.set_xlim(points[..., a].min() - 2, points[..., a].max() + 2)
            ax.set_ylim(points[..., b].min() - 2, points[..., b].max() + 2)
        ax.set_aspect("equal")
        ax.set_title(vname)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.legend(handles=handles, loc="lower center", ncol=min(8, max(1, len(handles))), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return _save(fig, path)
