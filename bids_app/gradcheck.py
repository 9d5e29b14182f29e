"""Gradient-table check, in the spirit of MRtrix3's ``dwigradcheck``: try every axis permutation and
sign flip of the b-vectors, track the principal diffusion directions each gives, keep the table
whose streamlines are longest.

A wrong sign or axis order in a ``.bvec`` file (a converter or a reorientation gone wrong) leaves
every scalar map intact but turns the principal directions of oblique fibres into a field that no
fibre follows: streamlines stop early.  Only one tensor fit is needed: with b-vectors ``M g`` (``M``
a signed permutation) the fitted tensor is ``M D M'``, so each candidate's principal directions
are ``M v1``.  The tracking is a quick deterministic one (nearest-neighbour principal direction,
step of half a voxel, FA > 0.15, 45 degrees), scored by the mean streamline length.

Candidates are written as the corrected table in terms of the file's columns, in the file's own
(FSL/BIDS) convention: ``-x y z`` means "negate the first row of the .bvec file".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from kernels.frames import fsl_flips_x

MODES = ("auto", "warn", "off")
SEED_FA = 0.4          # seeds: voxels above this FA (fewer than MIN_SEEDS: above 0.25)
MIN_SEEDS = 50
STOP_FA = 0.15
MAX_ANGLE = 45.0       # degrees between steps
MAX_LENGTH = 250.0     # mm
N_SEEDS = 4000
MARGIN = 0.10          # another table must give streamlines > 10% longer than the file's to win
IDENTITY = "x y z"


def candidates() -> list[tuple[str, np.ndarray]]:
    """The 24 tables worth trying: 6 axis orders x {no flip, flip one axis} (flipping two axes is
    flipping the third one, up to the sign of every vector, which a diffusion model ignores)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for flip in (None, 0, 1, 2):
            m = np.zeros((3, 3))
            for row, col in enumerate(perm):
                m[row, col] = -1.0 if flip == row else 1.0
            label = " ".join(("-" if flip == row else "") + "xyz"[col] for row, col in enumerate(perm))
            out.append((label, m))
    return out


def voxel_transform(file_transform: np.ndarray, affine) -> np.ndarray:
    """A transform of the .bvec file's vectors as a transform of voxel-frame vectors."""
    f = np.diag([-1.0, 1.0, 1.0]) if fsl_flips_x(affine) else np.eye(3)
    return f @ np.asarray(file_transform, dtype=float) @ f


@dataclass
class GradientCheck:
    mode: str
    scores: dict            # label -> mean streamline length (mm)
    best: str
    applied: str            # the table used: IDENTITY unless mode is auto and another one won
    n_seeds: int
    transforms: dict = field(default_factory=dict, repr=False)   # label -> 3x3 (file frame)

    @property
    def suspicious(self) -> bool:
        return self.best != IDENTITY

    @property
    def applied_transform(self) -> np.ndarray:
        return self.transforms[self.applied]

    def sidecar(self) -> dict:
        ranked = sorted(self.scores.items(), key=lambda kv: -kv[1])
        return {"Mode": self.mode,
                "Method": ("mean length of a quick deterministic tensor tractography for each axis "
                           "permutation and flip of the b-vectors (as MRtrix3 dwigradcheck)"),
                "Seeds": self.n_seeds, "Best": self.best, "Applied": self.applied,
                "AppliedTransform": self.applied_transform.tolist(),
                "TransformFrame": "the .bvec file's rows (FSL/BIDS convention): corrected = T @ file",
                "MeanStreamlineLength": {k: round(v, 2) for k, v in ranked}, "LengthUnit": "mm"}

    def summary(self) -> str:
        ident = self.scores[IDENTITY]
        best = self.scores[self.best]
        if not self.suspicious:
            runner = max((v for k, v in self.scores.items() if k != IDENTITY), default=0.0)
            return (f"gradient check: the table as given is the best ({ident:.1f} mm mean streamline length; "
                    f"next best {runner:.1f} mm)")
        verb = "applied" if self.applied == self.best else "NOT applied (--gradient-check warn)"
        return (f"gradient check: the b-vectors look wrong: '{self.best}' gives {best:.1f} mm mean "
                f"streamline length against {ident:.1f} mm for the table as given; correction {verb}")


def check_gradients(v1: np.ndarray, fa: np.ndarray, mask: np.ndarray, affine, mode: str = "auto",
                    n_seeds: int = N_SEEDS, rng_seed: int = 0) -> GradientCheck:
    """Score every candidate table from one DTI fit: ``v1`` (X, Y, Z, 3) principal eigenvectors in
    the voxel frame of the table as given, ``fa`` and ``mask`` on the same grid."""
    if mode not in MODES or mode == "off":
        raise ValueError(mode)
    fa = np.where(mask, np.nan_to_num(fa), 0.0).astype(np.float32)
    cands = candidates()
    seeds = _seeds(fa, n_seeds, rng_seed)
    zooms = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    scores = {}
    for label, t in cands:
        m = voxel_transform(t, affine)
        scores[label] = _mean_length(v1, m, fa, seeds, zooms) if len(seeds) else 0.0
    best = max(scores, key=lambda k: (scores[k], k == IDENTITY))
    if scores[best] <= scores[IDENTITY] * (1 + MARGIN):
        best = IDENTITY
    applied = best if mode == "auto" else IDENTITY
    return GradientCheck(mode=mode, scores=scores, best=best, applied=applied, n_seeds=len(seeds),
                         transforms={k: t for k, t in cands})


def _seeds(fa, n, rng_seed):
    vox = np.argwhere(fa > SEED_FA)
    if len(vox) < MIN_SEEDS:
        vox = np.argwhere(fa > 0.25)
    rng = np.random.default_rng(rng_seed)
    if len(vox) > n:
        vox = vox[rng.choice(len(vox), n, replace=False)]
    return vox + rng.uniform(-0.5, 0.5, size=vox.shape)


def _mean_length(v1, m, fa, seeds, zooms):
    """Mean length (mm) of deterministic streamlines on the direction field ``m @ v1``."""
    step = 0.5 * float(zooms.min())
    n_steps = int(MAX_LENGTH / step / 2)
    cos_max = np.cos(np.radians(MAX_ANGLE))
    shape = np.array(fa.shape)
    total = np.zeros(len(seeds))
    for sign in (1.0, -1.0):
        pos = seeds.copy()
        ijk = np.clip(np.rint(pos).astype(int), 0, shape - 1)
        prev = sign * (v1[tuple(ijk.T)] @ m.T)
        alive = np.ones(len(seeds), bool)
        for _ in range(n_steps):
            idx = np.flatnonzero(alive)
            if not len(idx):
                break
            p = pos[idx] + step * prev[idx] / zooms
            ijk = np.rint(p).astype(int)
            inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
            ijk = np.clip(ijk, 0, shape - 1)
            d = v1[tuple(ijk.T)] @ m.T
            c = np.einsum("ij,ij->i", d, prev[idx])
            d *= np.sign(c)[:, None] + (c == 0)[:, None]
            ok = inside & (fa[tuple(ijk.T)] > STOP_FA) & (np.abs(c) >= cos_max)
            alive[idx[~ok]] = False
            keep = idx[ok]
            pos[keep] = p[ok]
            prev[keep] = d[ok]
            total[keep] += step
    return float(total.mean())
