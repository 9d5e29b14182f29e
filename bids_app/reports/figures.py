"""The reports' figures (matplotlib, Agg), drawn from files the stages wrote.

Images are shown in RAS orientation whatever their voxel order (neurological convention: the
subject's right on the right of axial and coronal views), with the voxel aspect ratio kept.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..derivatives import atomic_write

DPI = 90
VIEWS = ("sagittal", "coronal", "axial")


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", facecolor=fig.get_facecolor())
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------- volumes

class Canonical:
    """A volume in RAS voxel order (display only) with its voxel sizes."""

    def __init__(self, img: nib.Nifti1Image, dtype=np.float32):
        can = nib.as_closest_canonical(img)
        self.data = np.asarray(can.dataobj, dtype=dtype)
        self.zooms = np.asarray(can.header.get_zooms()[:3], float)
        self.affine = can.affine

    @classmethod
    def load(cls, path, dtype=np.float32) -> "Canonical":
        return cls(nib.load(str(path)), dtype)


def centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The middle of the mask's bounding box (the volume's middle when the mask is empty)."""
    if mask is None or not mask.any():
        return tuple(s // 2 for s in mask.shape[:3])
    idx = np.argwhere(mask)
    return tuple(int(v) for v in (idx.min(0) + idx.max(0)) // 2)


def views(vol: np.ndarray, at) -> list[np.ndarray]:
    """Sagittal (y, z), coronal (x, z) and axial (x, y) slices through ``at``, rows = vertical axis."""
    i, j, k = at
    return [np.swapaxes(vol[i], 0, 1), np.swapaxes(vol[:, j], 0, 1), np.swapaxes(vol[:, :, k], 0, 1)]


def aspects(zooms) -> list[float]:
    x, y, z = zooms
    return [z / y, z / x, y / x]


def _blank(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _rl(ax, view: str):
    if view != "sagittal":
        ax.text(0.01, 0.5, "L", color="w", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.99, 0.5, "R", color="w", transform=ax.transAxes, fontsize=8, va="center", ha="right")


def slice_rows(rows, zooms, at, path: Path, *, contour=None, title: str = "") -> Path:
    """One row per ``(label, volume, cmap, vmin, vmax)`` (a 4D last axis of 3 is shown as RGB), three
    views each; ``contour``: a mask drawn in red on every row."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 2.9 * len(rows)), squeeze=False, facecolor="black")
    asp = aspects(zooms)
    for r, (label, vol, cmap, vmin, vmax) in enumerate(rows):
        cont = views(contour.astype(float), at) if contour is not None else None
        for c, sl in enumerate(views(vol, at)):
            ax = axes[r, c]
            if sl.ndim == 3:
                ax.imshow(np.clip(sl / (vmax or 1.0), 0, 1), origin="lower", aspect=asp[c], interpolation="nearest")
            else:
                im = ax.imshow(sl, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect=asp[c],
                               interpolation="nearest")
            if cont is not None:
                ax.contour(cont[c], levels=[0.5], colors="r", linewidths=0.8)
            _blank(ax)
            _rl(ax, VIEWS[c])
            if r == 0:
                ax.set_title(VIEWS[c], color="w", fontsize=9)
        axes[r, 0].set_ylabel(label, color="w")
        if vol.ndim == 3:
            cb = fig.colorbar(im, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01)
            cb.ax.tick_params(colors="w", labelsize=7)
    if title:
        fig.suptitle(title, color="w")
    return save(fig, path)


def robust_max(vol: np.ndarray, mask: np.ndarray, q: float = 99.5) -> float:
    vals = vol[mask] if mask is not None and mask.any() else vol[np.isfinite(vol)]
    return float(np.percentile(vals, q)) if vals.size else 1.0


# --------------------------------------------------------------------------- gradients

def gradient_figure(bvals: np.ndarray, dirs_world: np.ndarray, shells: list, path: Path) -> Path:
    """Directions of each shell on the unit sphere (both signs: the signal is antipodally symmetric),
    and the number of volumes per b-value."""
    plt = _plt()
    fig = plt.figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(shells))))
    for (b, sel), col in zip(shells, colours):
        v = dirs_world[sel]
        v = np.vstack([v, -v])
        ax.scatter(v[:, 0], v[:, 1], v[:, 2], s=10, color=col, label=f"b={b:g} ({int(sel.sum())})")
    u, w = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
    ax.plot_wireframe(np.cos(u) * np.sin(w), np.sin(u) * np.sin(w), np.cos(w), color="0.85", lw=0.3)
    ax.set_xlabel("x (R)")
    ax.set_ylabel("y (A)")
    ax.set_zlabel("z (S)")
    ax.set_box_aspect((1, 1, 1))
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("directions (world axes)", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    vals, counts = np.unique(np.round(bvals, -1), return_counts=True)
    ax2.bar([f"{v:g}" for v in vals], counts, color="steelblue")
    ax2.set_xlabel("b-value (s/mm², rounded to 10)")
    ax2.set_ylabel("volumes")
    ax2.set_title("volumes per b-value", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


# --------------------------------------------------------------------------- ODF glyphs

def glyph_radii(coeffs: np.ndarray, sh_order: int, to_sh_frame: np.ndarray):
    """``(directions (n, 3) in world axes, faces, radii (voxels, n))`` of ODF glyphs: the SH
    coefficients (MRtrix3 basis, in the frame ``to_sh_frame`` maps world directions to) evaluated on a
    100-direction sphere, negative lobes cut, scaled so that the 95th percentile of the maxima is 1."""
    from dipy.core.sphere import Sphere
    from dipy.data import get_sphere
    from dipy.reconst.shm import sh_to_sf

    sphere = get_sphere(name="repulsion100")
    v_world = sphere.vertices
    v_sh = v_world @ np.asarray(to_sh_frame).T
    v_sh /= np.linalg.norm(v_sh, axis=1, keepdims=True)
    sf = sh_to_sf(np.asarray(coeffs, np.float64), Sphere(xyz=v_sh), sh_order_max=int(sh_order),
                  basis_type="tournier07", legacy=False)
    sf = np.clip(np.atleast_2d(sf), 0, None)
    peak = np.percentile(sf.max(axis=1), 95) if len(sf) else 1.0
    return v_world, sphere.faces, np.clip(sf / max(float(peak), 1e-12), 0, 1)


def odf_glyph_figure(sh: np.ndarray, sh_order: int, to_sh_frame: np.ndarray, affine: np.ndarray,
                     background: np.ndarray, mask: np.ndarray, path: Path, *, size: int = 12) -> Path:
    """ODF glyphs (the SH evaluated on a 100-direction sphere) of a ``size`` x ``size`` patch of an
    axial slice (the slice with the most voxels of background > 0.3, the patch of highest mean
    background in it), drawn in world mm seen from above (x right, y anterior), coloured by direction,
    over the background map (the FA).

    ``to_sh_frame``: the 3x3 matrix taking world directions to the frame the SH refer to."""
    from matplotlib.collections import PolyCollection

    plt = _plt()
    # the voxel axis closest to world z is the axial slicing axis; the slice with the most anisotropic
    # voxels (FA-like background > 0.3), and in it the patch with the highest mean background
    from scipy.ndimage import uniform_filter
    ax_z = int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))
    others = [a for a in range(3) if a != ax_z]
    aniso = np.moveaxis((background > 0.3) & mask, ax_z, 0).reshape(mask.shape[ax_z], -1).sum(1)
    c = list(centre(mask))
    if aniso.max() > 0:
        c[ax_z] = int(np.argmax(aniso))
        plane = np.take(np.where(mask, background, 0), c[ax_z], axis=ax_z)
        best = np.unravel_index(np.argmax(uniform_filter(plane, size, mode="constant")), plane.shape)
        for a, v in zip(others, best):
            c[a] = int(v)
    sl = [slice(None)] * 3
    sl[ax_z] = c[ax_z]
    for a in others:
        lo = int(np.clip(c[a] - size // 2, 0, max(0, mask.shape[a] - size)))
        sl[a] = slice(lo, lo + size)
    sl = tuple(sl)
    idx = np.argwhere(np.ones(mask.shape, bool)[sl])
    full = np.zeros((len(idx), 3), int)
    for n, s in enumerate(sl):
        full[:, n] = s if isinstance(s, int) else idx[:, others.index(n)] + s.start
    inside = mask[tuple(full.T)]
    centres = nib.affines.apply_affine(affine, full)
    vox = float(np.min(np.linalg.norm(affine[:3, :3], axis=0)))
    v_world, faces, radii = glyph_radii(sh[tuple(full[inside].T)], sh_order, to_sh_frame)
    polys, depth, colours = [], [], []
    col = np.abs(v_world)
    for cen, r in zip(centres[inside], radii):
        pts = cen + 0.48 * vox * r[:, None] * v_world
        tri = pts[faces]
        polys.append(tri[:, :, :2])
        depth.append(tri[:, :, 2].mean(1))
        colours.append(col[faces].mean(1))
    fig, ax = plt.subplots(figsize=(6, 6), facecolor="black")
    bg = background[sl]
    grid = centres.reshape(bg.shape + (3,))
    ax.pcolormesh(grid[..., 0], grid[..., 1], bg, cmap="gray", shading="nearest", vmin=0,
                  vmax=robust_max(background, mask))
    if polys:
        polys = np.concatenate(polys)
        order = np.argsort(np.concatenate(depth))
        pc = PolyCollection(polys[order], facecolors=np.clip(np.concatenate(colours)[order], 0, 1),
                            edgecolors="none", antialiaseds=False)
        ax.add_collection(pc)
    ax.set_aspect("equal")
    ax.set_facecolor("black")
    ax.set_xlabel("x (mm, right)", color="w")
    ax.set_ylabel("y (mm, anterior)", color="w")
    ax.tick_params(colors="w", labelsize=7)
    ax.set_title(f"ODF glyphs, axial slice {c[ax_z]} (voxel axis {ax_z}), {int(inside.sum())} voxels",
                 color="w", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


# --------------------------------------------------------------------------- streamlines

def streamline_views(streamlines, lengths: np.ndarray, path: Path, title: str = "") -> Path:
    """Three projections of ``streamlines`` (each coloured by its end-to-end direction) and the
    histogram of ``lengths`` (mm, every streamline of the tractogram)."""
    plt = _plt()
    from matplotlib.collections import LineCollection

    fig = plt.figure(figsize=(12, 3.6), facecolor="white")
    gs = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.1])
    proj = (("sagittal", 1, 2, "y (mm, A)", "z (mm, S)"), ("coronal", 0, 2, "x (mm, R)", "z (mm, S)"),
            ("axial", 0, 1, "x (mm, R)", "y (mm, A)"))
    sl = [np.asarray(s, np.float32) for s in streamlines if len(s) > 1]
    colours = np.array([np.abs(s[-1] - s[0]) / max(np.linalg.norm(s[-1] - s[0]), 1e-6) for s in sl]) \
        if sl else np.zeros((0, 3))
    allpts = np.concatenate(sl) if sl else np.zeros((0, 3))
    for n, (name, a, b, xl, yl) in enumerate(proj):
        ax = fig.add_subplot(gs[n], facecolor="black")
        if sl:
            ax.add_collection(LineCollection([s[:, [a, b]] for s in sl], colors=np.clip(colours, 0, 1),
                                             linewidths=0.4, alpha=0.6))
            ax.set_xlim(allpts[:, a].min() - 2, allpts[:, a].max() + 2)
            ax.set_ylim(allpts[:, b].min() - 2, allpts[:, b].max() + 2)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[3])
    if len(lengths):
        ax.hist(lengths, bins=40, color="steelblue")
        ax.axvline(float(np.median(lengths)), color="k", lw=1, ls="--",
                   label=f"median {np.median(lengths):.1f} mm")
        ax.legend(fontsize=7)
    ax.set_xlabel("length (mm)", fontsize=8)
    ax.set_ylabel("streamlines", fontsize=8)
    ax.set_title(f"lengths (all {len(lengths):,})", fontsize=9)
    ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


# --------------------------------------------------------------------------- group

def registration_grid(fa4d: np.ndarray, reference: np.ndarray, labels, corr, zooms, path: Path,
                      columns: int = 4) -> Path:
    """Each participant's registered FA (axial slice through the reference's middle) with the
    reference's FA = 0.2 contour in red, and the correlation before -> after registration."""
    plt = _plt()
    n = fa4d.shape[-1]
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False,
                             facecolor="black")
    at = centre(reference > 0)
    ref_sl = views(reference, at)[2]
    asp = aspects(zooms)[2]
    for k, ax in enumerate(axes.ravel()):
        _blank(ax)
        if k >= n:
            ax.set_visible(False)
            continue
        ax.imshow(views(fa4d[..., k], at)[2], cmap="gray", vmin=0, vmax=0.8, origin="lower", aspect=asp,
                  interpolation="nearest")
        ax.contour(ref_sl, levels=[0.2], colors="r", linewidths=0.7)
        before, after = corr[k]
        ax.set_title(f"{labels[k]}\nr {before:.2f} → {after:.2f}", color="w", fontsize=8)
        _rl(ax, "axial")
    fig.tight_layout()
    return save(fig, path)


def overlay_views(background: np.ndarray, overlay: np.ndarray, zooms, path: Path, *, at=None, cmap="autumn",
                  vmin=None, vmax=None, label: str = "", title: str = "") -> Path:
    """``overlay`` (NaN = transparent) on ``background`` in three views through ``at``."""
    plt = _plt()
    at = at or centre(background > 0)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), facecolor="black")
    asp = aspects(zooms)
    im = None
    for c, (bg, ov) in enumerate(zip(views(background, at), views(overlay, at))):
        ax = axes[c]
        ax.imshow(bg, cmap="gray", vmin=0, vmax=robust_max(background, background > 0), origin="lower",
                  aspect=asp[c], interpolation="nearest")
        im = ax.imshow(np.ma.masked_invalid(ov), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect=asp[c],
                       interpolation="nearest")
        _blank(ax)
        _rl(ax, VIEWS[c])
        ax.set_title(VIEWS[c], color="w", fontsize=9)
    if im is not None:
        cb = fig.colorbar(im, ax=axes.tolist(), fraction=0.02, pad=0.01)
        cb.ax.tick_params(colors="w", labelsize=7)
        cb.set_label(label, color="w", fontsize=8)
    if title:
        fig.suptitle(title, color="w", fontsize=10)
    return save(fig, path)
