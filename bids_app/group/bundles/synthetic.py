"""Synthetic tractograms with known labels, built on the demo phantom (tests, benchmark).

A subject's "tracked" streamlines are the phantom's true trajectories, jittered,
randomly shortened at both ends and mapped into the subject's space by the
demo's own warp; spurious streamlines are smooth random curves inside the brain
that stay away from every bundle.  Ground-truth labels index the phantom's
bundle names (-1 for spurious).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree


@dataclass
class SyntheticSubject:
    streamlines: list            # (k, 3) arrays, subject world mm
    truth: np.ndarray            # bundle index per streamline, -1 = spurious
    names: list
    to_template: Callable        # (n, 3) subject mm -> template mm (the true warp)
    affine_to_template: np.ndarray  # its affine part


def _smooth_noise(rng, n, sd, corr=8):
    """(n, 3) smooth random offsets (a random walk low-passed), zero mean, std ~ sd."""
    w = rng.normal(size=(n + 2 * corr, 3))
    k = np.hanning(2 * corr + 1)
    k /= k.sum()
    sm = np.stack([np.convolve(w[:, c], k, mode="same") for c in range(3)], 1)[corr:corr + n]
    sm -= sm.mean(0)
    s = sm.std()
    return sm * (sd / s if s > 0 else 0.0)


def _shorten(rng, f, max_frac):
    n = len(f)
    a = int(rng.uniform(0, max_frac) * n)
    b = n - int(rng.uniform(0, max_frac) * n)
    return f[a:max(b, a + 2)]


def jittered_bundles(bundles: dict, rng, copies: int = 1, jitter: float = 0.5,
                     shorten: float = 0.15) -> dict:
    """Copies of every fibre with smooth jitter (mm) and random shortening at each end."""
    out = {}
    for name, fibres in bundles.items():
        new = []
        for f in fibres:
            for _ in range(copies):
                g = np.asarray(f, float) + _smooth_noise(rng, len(f), jitter)
                new.append(_shorten(rng, g, shorten))
        out[name] = new
    return out


def spurious_curves(n: int, rng, inside: Callable, avoid: np.ndarray, min_dist: float = 4.0,
                    length=(15.0, 45.0), step: float = 1.0, bbox=((-40, 40), (-50, 50), (-30, 30)),
                    max_tries: int = 200000) -> list:
    """Smooth random curves (template mm) inside ``inside(points)`` whose points lie on average
    at least ``min_dist`` from the ``avoid`` points (the true trajectories)."""
    tree = cKDTree(avoid)
    lo = np.array([b[0] for b in bbox], float)
    hi = np.array([b[1] for b in bbox], float)
    out, tries = [], 0
    while len(out) < n and tries < max_tries:
        tries += 1
        p = rng.uniform(lo, hi)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        k = int(rng.uniform(*length) / step)
        pts = [p]
        for _ in range(k):
            d = d + 0.15 * rng.normal(size=3)
            d /= np.linalg.norm(d)
            pts.append(pts[-1] + step * d)
        pts = np.asarray(pts)
        if not np.all(inside(pts)):
            continue
        dist, _ = tree.query(pts)
        if dist.mean() < min_dist or np.mean(dist < 2.0) > 0.2:
            continue
        out.append(pts)
    return out


def demo_like_subject(seed: int = 1, size: str = "small", copies: int = 2, jitter: float = 0.5,
                      shorten: float = 0.15, n_spurious: int = 40, warp: bool = True,
                      spurious_min_dist: float = 7.0) -> SyntheticSubject:
    """One synthetic subject from the demo phantom (see module docstring)."""
    from ...demo import phantom
    from ...demo.phantom import BUNDLES, template_trajectories
    from ...demo.simulate import Warp, map_streamlines, random_warp

    rng = np.random.default_rng([seed, 4242])
    tpl = template_trajectories(size)
    w = random_warp(seed, size) if warp else Warp()
    geom = phantom.geometry(size)
    fib = jittered_bundles(tpl, rng, copies, jitter, shorten)
    spur = spurious_curves(n_spurious, rng, lambda p: phantom.tissue_class(p, geom) > 0,
                           np.concatenate([np.concatenate(v) for v in tpl.values()]),
                           min_dist=spurious_min_dist, bbox=tuple((-a, a) for a in geom.brain_axes))
    names = list(BUNDLES)
    streamlines, truth = [], []
    for k, name in enumerate(names):
        streamlines += fib[name]
        truth += [k] * len(fib[name])
    streamlines += spur
    truth += [-1] * len(spur)
    subj = map_streamlines({"all": streamlines}, w.from_template)["all"]
    return SyntheticSubject(subj, np.asarray(truth, np.int64), names, w.to_template, w.affine)


def template_atlas_bundles(size: str = "small") -> dict:
    """The phantom's true trajectories in template space: ``{bundle: [fibres]}``."""
    from ...demo.phantom import template_trajectories
    return template_trajectories(size)


def large_tractogram(n: int, seed: int = 0, size: str = "small", jitter: float = 1.0,
                     npts: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``n`` resampled fibres (n, npts, 3) drawn from the phantom's bundles with jitter, and their
    labels (for the benchmark: large inputs without simulating tracking)."""
    from ...demo.phantom import BUNDLES, template_trajectories
    from .fibres import resample

    rng = np.random.default_rng(seed)
    tpl = template_trajectories(size)
    base, lab = [], []
    for k, name in enumerate(BUNDLES):
        r = resample(tpl[name], npts)
        base.append(r)
        lab.append(np.full(len(r), k))
    base = np.concatenate(base)
    lab = np.concatenate(lab)
    pick = rng.integers(0, len(base), n)
    out = base[pick].copy()
    # smooth per-fibre jitter: a random offset and a random linear drift along the fibre
    t = np.linspace(-1, 1, npts)[None, :, None]
    out += rng.normal(scale=jitter, size=(n, 1, 3)) + t * rng.normal(scale=jitter / 2, size=(n, 1, 3))
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, ::-1]
    return out, lab[pick]


def to_subject_space(points: np.ndarray, field, n_iter: int = 20) -> np.ndarray:
    """Invert ``template = subject + field(subject)`` at template points by fixed-point iteration
    (``field``: a :class:`bids_app.group.transforms.DisplacementField` on the subject grid)."""
    y = np.asarray(points, float)
    x = y.copy()
    for _ in range(n_iter):
        x = y - field.displacement(x)
    return x


def participant_outputs_from_demo(bids_dir, output_dir, *, copies: int = 2, n_spurious: int = 40,
                                  seed: int = 0, transforms: bool = True, space: str = "phantom",
                                  track: str = "prob", spurious_min_dist: float = 7.0) -> list:
    """Fill ``output_dir`` like the participant level would, from a demo dataset's ground truth.

    Per subject: DTI maps fitted (dipy) on the raw DWI, a tractogram made of the true
    trajectories (jittered, shortened; ``copies`` per trajectory) plus ``n_spurious`` spurious
    curves, and -- with ``transforms`` -- the TBSS-style transforms to ``space`` built from the
    true deformation.  Returns ``[{"entities", "truth", "names"}]`` (truth: bundle index per
    streamline, -1 spurious, in the tractogram's order).
    """
    from pathlib import Path

    import nibabel as nib
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel
    from ...demo import phantom
    from ...demo.dataset import write_trx
    from ...demo.phantom import BUNDLES
    from ...derivatives import bids_name, save_nifti, subject_dir
    from ...trx_reader import open_trx
    from ..transforms import DisplacementField, SubjectTransform

    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    gt = bids_dir / "sourcedata" / "groundtruth"
    tpl_img = nib.load(gt / "template" / "tpl-phantom_desc-brain_mask.nii.gz")
    geom = phantom.geometry("small")
    tpl_traj = template_trajectories_from(gt / "template" / "tpl-phantom_tractogram.trx")
    avoid = np.concatenate([np.concatenate(v) for v in tpl_traj.values()])
    out = []
    for k, dwi in enumerate(sorted(bids_dir.glob("sub-*/**/dwi/*_dwi.nii.gz"))):
        ents = {p.split("-", 1)[0]: p.split("-", 1)[1] for p in dwi.name.split("_")[:-1]}
        rel = dwi.parent.parent.relative_to(bids_dir)
        stem = dwi.name[: -len("_dwi.nii.gz")]
        img = nib.load(dwi)
        data = np.asarray(img.dataobj, np.float32)
        bvals = np.loadtxt(dwi.with_name(stem + "_dwi.bval"))
        bvecs = np.loadtxt(dwi.with_name(stem + "_dwi.bvec")).T
        mask = data[..., bvals < 50].mean(-1) > 0
        fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(data, mask=mask)
        d = subject_dir(output_dir, ents)
        for name, arr in (("fa", fit.fa), ("md", fit.md), ("ad", fit.ad), ("rd", fit.rd)):
            save_nifti(np.nan_to_num(arr), img.affine,
                       d / bids_name({**ents, "model": "tensor", "param": name}, "dwimap", ".nii.gz"))
        field = DisplacementField.load(gt / rel / f"{stem}_desc-deformation_xfm.nii.gz")
        with open_trx(gt / rel / f"{stem}_tractogram.trx") as trx:
            true = {b: [np.asarray(trx.streamlines[i], float) for i in trx.groups[b]] for b in trx.groups}
        rng = np.random.default_rng([seed, k])
        fib = jittered_bundles(true, rng, copies)
        spur_t = spurious_curves(n_spurious, rng, lambda p: phantom.tissue_class(p, geom) > 0, avoid,
                                 min_dist=spurious_min_dist, bbox=tuple((-a, a) for a in geom.brain_axes))
        spur = [to_subject_space(s, field) for s in spur_t]
        names = list(BUNDLES)
        sl, truth = [], []
        for b in names:
            sl += fib.get(b, [])
            truth += [names.index(b)] * len(fib.get(b, []))
        sl += spur
        truth += [-1] * len(spur)
        perm = rng.permutation(len(sl))
        sl = [sl[i] for i in perm]
        truth = np.asarray(truth)[perm]
        write_trx({"all": sl}, img.shape[:3], img.affine,
                  d / bids_name({**ents, "track": track}, "tractogram", ".trx"))
        if transforms:
            inv = DisplacementField.from_function(lambda p: to_subject_space(p, field), tpl_img.shape,
                                                  tpl_img.affine)
            SubjectTransform(ents, space, inv, field).save(output_dir)
        out.append({"entities": ents, "truth": truth, "names": names})
    return out


def template_trajectories_from(path) -> dict:
    """``{group: [fibres]}`` of a TRX file."""
    from ...trx_reader import open_trx

    with open_trx(path) as trx:
        return {b: [np.asarray(trx.streamlines[i], float) for i in trx.groups[b]] for b in trx.groups}


def random_bundles(n_fibres: int, n_bundles: int = 80, seed: int = 0, npts: int = 20,
                   centres_seed: int = 0, jitter: float = 1.0,
                   semi_axes=(70.0, 85.0, 60.0)) -> tuple[np.ndarray, np.ndarray]:
    """A brain-sized synthetic tractogram: ``n_bundles`` smooth bundles (random cubic curves of
    40-150 mm inside an ellipsoid, radius 2-6 mm) and ``n_fibres`` resampled fibres drawn from
    them, (n, npts, 3) and labels.  ``centres_seed`` fixes the bundles (share it between a subject
    and an atlas); ``seed`` the fibres."""
    from .fibres import resample

    crng = np.random.default_rng([centres_seed, 77])
    ax = np.asarray(semi_axes)
    t = np.linspace(0, 1, npts)[:, None]
    centre, radius, frame = [], [], []
    while len(centre) < n_bundles:
        p0 = crng.uniform(-1, 1, 3) * ax * 0.8
        d = crng.normal(size=3)
        d /= np.linalg.norm(d)
        length = crng.uniform(40, 150)
        p3 = p0 + d * length
        bend = crng.normal(scale=0.25 * length, size=(2, 3))
        p1, p2 = p0 + (p3 - p0) / 3 + bend[0], p0 + 2 * (p3 - p0) / 3 + bend[1]
        curve = ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3)
        if np.any(np.sum((curve / ax) ** 2, axis=1) > 1):
            continue
        curve = resample([curve], npts)[0]
        tan = np.gradient(curve, axis=0)
        tan /= np.linalg.norm(tan, axis=1, keepdims=True)
        ref = np.array([1.0, 0, 0]) if abs(tan[0, 0]) < 0.9 else np.array([0, 1.0, 0])
        n1 = np.cross(tan, ref)
        n1 /= np.linalg.norm(n1, axis=1, keepdims=True)
        n2 = np.cross(tan, n1)
        centre.append(curve)
        radius.append(crng.uniform(2, 6))
        frame.append((n1, n2))
    rng = np.random.default_rng([seed, 78])
    lab = rng.integers(0, n_bundles, n_fibres)
    out = np.empty((n_fibres, npts, 3))
    for k in range(n_bundles):
        sel = np.flatnonzero(lab == k)
        if not len(sel):
            continue
        r = radius[k] * np.sqrt(rng.random(len(sel)))
        th = rng.uniform(0, 2 * np.pi, len(sel))
        n1, n2 = frame[k]
        off = (r * np.cos(th))[:, None, None] * n1[None] + (r * np.sin(th))[:, None, None] * n2[None]
        out[sel] = centre[k][None] + off + rng.normal(scale=jitter, size=(len(sel), 1, 3))
    flip = rng.random(n_fibres) < 0.5
    out[flip] = out[flip, ::-1]
    return out, lab
