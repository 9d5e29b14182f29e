"""Train a PCCNN for angular super-resolution on DWI runs (the demo model: :data:`.nets.DEMO_HYPER`).

Every step takes a batch of random patches (centred on a brain voxel) of the training runs; on each
shell a random number of directions in ``[q_in_min, q_in_max]`` is the input and ``q_out`` other
directions (of any shell) are the targets; the loss is the mean absolute error of the scaled signal
over the brain voxels of the patches (AdamW).  This follows the reference training scheme (random
q-space subsets, L1, AdamW) at a size that trains on a laptop's CPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """One DWI run: ``scaled`` (X, Y, Z, N) per-shell scaled signal of its diffusion-weighted volumes,
    ``q`` (N, 3) q-space points (unit direction x b / 1000), ``shell`` (N,) shell index, ``mask``."""

    scaled: np.ndarray
    q: np.ndarray
    shell: np.ndarray
    mask: np.ndarray
    name: str = ""


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 600
    batch_size: int = 6
    patch: int = 8
    q_in_min: int = 8
    q_in_max: int = 16
    q_out: int = 10
    learning_rate: float = 2e-3
    seed: int = 0


def prepare_run(data, bvals, bvecs, mask, shells, percentile: float = 99.0, name: str = "") -> TrainingRun:
    from .predict import normalise, shell_groups
    from .nets import BVAL_UNIT
    bvals = np.asarray(bvals, float)
    groups = shell_groups(bvals, shells)
    scaled, _ = normalise(np.asarray(data, np.float32), groups, mask, percentile)
    idx = np.concatenate([groups[s] for s in sorted(groups)])
    shell = np.concatenate([np.full(len(groups[s]), k) for k, s in enumerate(sorted(groups))])
    q = np.asarray(bvecs, float)[idx] * (bvals[idx] / BVAL_UNIT)[:, None]
    return TrainingRun(scaled=scaled[..., idx].copy(), q=q.astype(np.float32), shell=shell, mask=mask, name=name)


def _sample(runs, st: TrainSettings, rng):
    n_shells = int(max(r.shell.max() for r in runs)) + 1
    k = int(rng.integers(st.q_in_min, st.q_in_max + 1))
    p = st.patch
    xs, ms, qis, qos, ys = [], [], [], [], []
    for _ in range(st.batch_size):
        r = runs[int(rng.integers(len(runs)))]
        centres = r.centres
        c = centres[int(rng.integers(len(centres)))]
        lo = np.clip(c - p // 2, 0, np.array(r.mask.shape) - p)
        sl = tuple(slice(a, a + p) for a in lo)
        inp, rest = [], []
        for s in range(n_shells):
            idx = rng.permutation(np.flatnonzero(r.shell == s))
            inp.append(idx[:k])
            rest.append(idx[k:])
        inp = np.concatenate(inp)
        out = rng.choice(np.concatenate(rest), st.q_out, replace=False)
        block = r.scaled[sl]
        xs.append(block[..., inp])
        ys.append(block[..., out])
        ms.append(r.mask[sl])
        qis.append(r.q[inp])
        qos.append(r.q[out])
    return [np.stack(a) for a in (xs, qis, qos, ys, ms)]


def train(runs, hyper, settings: TrainSettings | None = None, *, device: str = "cpu", progress: bool = False):
    """``(module, summary)``: a PCCNN with ``hyper`` trained on ``runs`` (:class:`TrainingRun`)."""
    import torch
    from tqdm import tqdm

    from .nets import PCCNNModule
    st = settings or TrainSettings()
    p = st.patch
    for r in runs:
        if min(r.mask.shape) < p:
            raise ValueError(f"{r.name}: the image is smaller than a {p}-voxel patch")
        per_shell = np.bincount(r.shell)
        if per_shell.min() < st.q_in_max + 1 or per_shell.sum() - len(per_shell) * st.q_in_max < st.q_out:
            raise ValueError(f"{r.name}: {per_shell.min()} directions on a shell; training needs more than "
                             f"q_in_max ({st.q_in_max}) per shell plus {st.q_out} targets")
        core = np.zeros_like(r.mask)
        h = p // 2
        core[h:r.mask.shape[0] - p + h, h:r.mask.shape[1] - p + h, h:r.mask.shape[2] - p + h] = True
        r.centres = np.argwhere(r.mask & core)
        if not len(r.centres):
            raise ValueError(f"{r.name}: no brain voxel a patch can be centred on")
    torch.manual_seed(st.seed)
    rng = np.random.default_rng(st.seed)
    module = PCCNNModule(hyper).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=st.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=st.steps)
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(st.steps), unit="step", desc="train-angular-sr", disable=None if progress else True)
    for _ in bar:
        x, qi, qo, y, m = (torch.from_numpy(a).to(device) for a in _sample(runs, st, rng))
        pred = module(x, qi, qo)
        w = m[..., None].float()
        loss = ((pred - y).abs() * w).sum() / (w.sum() * y.shape[-1]).clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    module.eval()
    tail = max(1, len(losses) // 10)
    summary = {"Steps": st.steps, "Seconds": round(time.perf_counter() - t0, 1),
               "FinalLoss": round(float(np.mean(losses[-tail:])), 5),
               "FirstLoss": round(float(np.mean(losses[:tail])), 5),
               "Parameters": sum(q.numel() for q in module.parameters())}
    return module, summary
