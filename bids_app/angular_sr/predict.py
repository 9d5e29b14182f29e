"""Predict the signal at new q-space points of a DWI run with a PCCNN.

As in the reference implementation: each shell's signal is scaled to about [-1, 1] by its
``percentile`` (99th) within the brain mask (``2 x / xmax - 1``; the b=0 volumes are not used), the
q-space points are the gradient directions times b / 1000, the volume is cut into cubic patches of
the model's size (patches without a brain voxel are skipped) and the new points are predicted
``q_out`` at a time, every acquired diffusion-weighted volume being the input of every pass.  The
layers that see only the input points run once per patch, not once per pass (the reference reruns
them for every group of ``q_out`` points; the result is the same).  The
network only sees angles between directions, so any orthonormal frame of the b-vectors will do.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .modelfile import SHELL_TOLERANCE
from .nets import BVAL_UNIT

B0_THRESHOLD = 50.0


@lru_cache(maxsize=16)
def _spread(n: int, seed: int) -> np.ndarray:
    from dipy.core.sphere import HemiSphere, disperse_charges
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    hemi = HemiSphere(xyz=v / np.linalg.norm(v, axis=1, keepdims=True))
    hemi, _ = disperse_charges(hemi, 200)
    return np.asarray(hemi.vertices, dtype=np.float64)


def spread_directions(n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere (antipodal symmetry: electrostatic repulsion
    of ``n`` charge pairs, dipy ``disperse_charges``); deterministic for a seed."""
    return _spread(int(n), int(seed)).copy()


def shell_groups(bvals, shells) -> dict:
    """{model shell: indices of the volumes on it} for the diffusion-weighted volumes."""
    b = np.asarray(bvals, dtype=float)
    out = {}
    for s in shells:
        idx = np.flatnonzero((b > B0_THRESHOLD) & (np.abs(b - s) <= SHELL_TOLERANCE))
        if idx.size:
            out[float(s)] = idx
    return out


def normalise(data: np.ndarray, groups: dict, mask: np.ndarray, percentile: float):
    """``(scaled (X,Y,Z,N) float32, {shell: xmax})``: each shell divided by its percentile in the mask."""
    out = np.zeros(data.shape, dtype=np.float32)
    xmax = {}
    for s, idx in groups.items():
        v = data[..., idx]
        x = float(np.percentile(v[mask], percentile)) if mask.any() else float(np.percentile(v, percentile))
        x = x if x > 0 else 1.0
        out[..., idx] = 2.0 * v / x - 1.0
        xmax[s] = x
    return out, xmax


def target_table(groups: dict, bvals, n_new: int, seed: int = 0):
    """``(bvals (M,), unit bvecs (M, 3))`` of the requested points: ``n_new`` spread directions on
    every acquired shell (at the shell's median acquired b-value), shells interleaved."""
    per = []
    for k, (s, idx) in enumerate(sorted(groups.items())):
        b = float(np.round(np.median(np.asarray(bvals, float)[idx])))
        per.append((b, spread_directions(n_new, seed + 101 * k)))
    order = [(j, i) for i in range(n_new) for j in range(len(per))]
    return (np.array([per[j][0] for j, _ in order]), np.array([per[j][1][i] for j, i in order]))


def _chunks(m: int, q: int):
    """Index windows of length q covering range(m) (the last one shifted back; ``keep`` the new part)."""
    if m <= q:
        idx = np.resize(np.arange(m), q)
        return [(idx, slice(0, m))]
    out = []
    for start in range(0, m, q):
        if start + q <= m:
            out.append((np.arange(start, start + q), slice(0, q)))
        else:
            out.append((np.arange(m - q, m), slice(q - (m - start), q)))
    return out


def check_targets(groups: dict, target_bvals) -> None:
    """Every requested b-value must be an acquired shell (its intensity scale comes from the data)."""
    from .modelfile import ShellError
    bad = sorted({int(round(b)) for b in np.asarray(target_bvals, float)
                  if min(abs(b - s) for s in groups) > SHELL_TOLERANCE})
    if bad:
        raise ShellError(f"requested b-value(s) {', '.join(map(str, bad))} are not acquired shells "
                         f"({', '.join(str(int(s)) for s in sorted(groups))} s/mm^2)")


def super_resolve(module, info, data, bvals, bvecs, mask, *, n_new: int = 60, targets=None, device: str = "cpu",
                  batch_size: int = 4, seed: int = 0, progress: bool = False):
    """Predict ``n_new`` new directions on every acquired shell of ``data`` (X, Y, Z, N), or the
    volumes ``targets = (bvals (M,), unit bvecs (M, 3))``.

    ``bvecs`` (N, 3) unit vectors in any orthonormal frame (``targets`` in the same); the new ones come
    back in that frame.  Returns ``(predicted (X, Y, Z, M) float32, bvals (M,), bvecs (M, 3), details)``; the
    prediction is zero outside ``mask``.
    """
    import torch
    from tqdm import tqdm

    data = np.asarray(data, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    bvals = np.asarray(bvals, dtype=float)
    groups = shell_groups(bvals, info.match_shells(bvals))
    dw = np.concatenate([groups[s] for s in sorted(groups)])
    q_in = (np.asarray(bvecs, float)[dw] * (bvals[dw] / BVAL_UNIT)[:, None]).astype(np.float32)
    if targets is None:
        new_b, new_v = target_table(groups, bvals, n_new, seed)
    else:
        new_b, new_v = (np.asarray(t, dtype=float) for t in targets)
        check_targets(groups, new_b)
    q_new = (new_v * (new_b / BVAL_UNIT)[:, None]).astype(np.float32)

    p = info.patch
    shape = np.array(data.shape[:3])
    padded = (np.ceil(shape / p) * p).astype(int)
    vol = np.zeros(tuple(padded) + (len(dw),), dtype=np.float32)   # scaled input, zero padded
    xmax, col = {}, 0
    for s in sorted(groups):
        scaled, x = normalise(data[..., groups[s]], {s: np.arange(len(groups[s]))}, mask, info.percentile)
        vol[:shape[0], :shape[1], :shape[2], col:col + len(groups[s])] = scaled
        xmax[s], col = x[s], col + len(groups[s])
        del scaled
    mpad = np.zeros(tuple(padded), dtype=bool)
    mpad[:shape[0], :shape[1], :shape[2]] = mask
    corners = [(i, j, k) for i in range(0, padded[0], p) for j in range(0, padded[1], p)
               for k in range(0, padded[2], p) if mpad[i:i + p, j:j + p, k:k + p].any()]
    out = np.zeros(tuple(padded) + (len(new_b),), dtype=np.float32)
    windows = _chunks(len(new_b), info.q_out)
    dev = torch.device(device)
    qi = torch.from_numpy(q_in).to(dev)
    bar = tqdm(total=len(corners), unit="patch", desc="angular SR", leave=False, disable=None if progress else True)
    with torch.inference_mode():
        for s in range(0, len(corners), batch_size):
            batch = corners[s:s + batch_size]
            x = torch.from_numpy(np.stack([vol[i:i + p, j:j + p, k:k + p] for i, j, k in batch])).to(dev)
            q_in_b = qi[None].expand(len(batch), -1, -1)
            features = module.pccnn.encode(x, q_in_b)                  # once per patch, not per pass
            for idx, keep in windows:
                qo = torch.from_numpy(q_new[idx]).to(dev)[None].expand(len(batch), -1, -1)
                y = module.pccnn.decode(features, q_in_b, qo).float().cpu().numpy()   # (b, p, p, p, q_out)
                cols = idx[keep]
                for n, (i, j, k) in enumerate(batch):
                    out[i:i + p, j:j + p, k:k + p, cols] = y[n, ..., keep]
            bar.update(len(batch))
    bar.close()
    out = out[:shape[0], :shape[1], :shape[2]]
    for s in groups:                                   # back to the shell's intensity scale
        cols = np.abs(new_b - s) <= SHELL_TOLERANCE
        out[..., cols] = (out[..., cols] + 1.0) * xmax[s] / 2.0
    np.clip(out, 0, None, out=out)
    out[~mask] = 0
    details = {"Patches": len(corners), "PatchSize": p, "BatchSize": int(batch_size),
               "Passes": -(-len(corners) // batch_size) * len(windows),
               "Scale": {str(int(s)): x for s, x in xmax.items()}}
    return out, new_b, new_v, details

