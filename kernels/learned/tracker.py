"""Batched tracking with a learned model (PyTorch, CPU or CUDA).

Every seed of a chunk advances together, one point per network step.  From each seed the
streamline is tracked forward; the network then reads that half back from its far end to the seed
(so its state holds the whole path, as when it was trained on whole streamlines) and continues
past the seed in the other direction; the two halves are joined.  A streamline stops when the
network's end-of-streamline probability exceeds ``eos_threshold``, when the next point leaves the
stopping map (trilinear value <= ``stop_threshold``) or the image, when no direction is offered
within ``max_angle`` of the previous step, or at ``max_length``.  Random draws (``direction=
"sample"``) come from the counter-based generator of the other trackers, keyed on (rng seed, seed
index, half, step): a streamline depends on its seed only, not on the chunk it is tracked in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ParameterError
from ..params import max_points, min_points
from ..tracking_core import _GOLD, splitmix64, stream_key
from .sampling import SignalFeatures, VolumeSampler

DIRECTIONS = ("max", "sample")
_INV53 = 1.0 / 9007199254740992.0


@dataclass(frozen=True)
class LearnedParams:
    """Settings of learned tracking; lengths in mm, angles in degrees.  ``step_size`` is the
    model's own (its input specification)."""

    step_size: float
    max_angle: float = 30.0
    min_length: float = 10.0
    max_length: float = 250.0
    stop_threshold: float = 0.5
    eos_threshold: float = 0.5
    direction: str = "max"          # max: the most probable direction; sample: a random draw
    rng_seed: int = 0

    def __post_init__(self):
        checks = (("step_size", self.step_size > 0 and math.isfinite(self.step_size), "must be > 0 mm"),
                  ("max_angle", 0 < self.max_angle <= 180, "must be in (0, 180] degrees"),
                  ("min_length", 0 <= self.min_length <= self.max_length, "must be in [0, max_length] mm"),
                  ("max_length", self.max_length >= self.step_size and math.isfinite(self.max_length),
                   "must be at least one step"),
                  ("eos_threshold", 0 < self.eos_threshold <= 1, "must be in (0, 1]"),
                  ("direction", self.direction in DIRECTIONS, f"must be one of {', '.join(DIRECTIONS)}"),
                  ("rng_seed", self.rng_seed >= 0, "must be >= 0"))
        for name, ok, problem in checks:
            if not ok:
                raise ParameterError(name, f"{problem} (got {getattr(self, name)!r})")

    @property
    def max_points(self) -> int:
        return max_points(self.max_length, self.step_size)

    @property
    def min_points(self) -> int:
        return min_points(self.min_length, self.step_size)


def uniforms(keys: np.ndarray, stream: int, draw: int, n: int = 2) -> np.ndarray:
    """(B, n) uniforms in [0, 1) from the counter-based generator, one row per stream key."""
    out = np.empty((len(keys), n))
    with np.errstate(over="ignore"):
        for j in range(n):
            c = np.array([(stream << 32) ^ (draw * n + j)], dtype=np.uint64)
            out[:, j] = (splitmix64(keys ^ splitmix64(c + _GOLD)) >> np.uint64(11)) * _INV53
    return out


class LearnedTracker:
    """A model, the signal it reads and the stopping map, on one device; :meth:`run` tracks seeds."""

    def __init__(self, model, inputs, signal, affine, stop_map, params: LearnedParams, device="cpu"):
        self.model, self.params, self.device = model, params, torch.device(device)
        self.features = SignalFeatures(signal, affine, inputs, self.device)
        self.stop = VolumeSampler(stop_map, affine, self.device)
        self.cos_max = math.cos(math.radians(params.max_angle))
        self.affine = np.asarray(affine, dtype=np.float64)

    # ------------------------------------------------------------------ one half
    def _half(self, start, prev, keys, state, budget, stream):
        """Advance from ``start`` until every streamline stops; returns points (B, T, 3), counts
        (B,) and the first direction chosen for each (B, 3).  Stopped streamlines stay in the batch
        (their results unused) until fewer than half are alive, then the batch is compacted."""
        p, model = self.params, self.model
        b = start.shape[0]
        pts = torch.zeros(b, int(min(budget.max().item(), 64)), 3, device=self.device)
        pts[:, 0] = start
        count = torch.ones(b, dtype=torch.long, device=self.device)
        first = torch.zeros(b, 3, device=self.device)
        rows = torch.arange(b, device=self.device)          # the seed of each row of the batch
        rows_np = np.arange(b)
        alive = torch.ones(b, dtype=torch.bool, device=self.device)
        pos = start
        for step in range(int(budget.max().item())):
            out, eos, state = model.step(self.features(pos), prev, state)
            u = torch.as_tensor(uniforms(keys[rows_np], stream, step), dtype=torch.float32, device=self.device)
            d, ok = model.head.choose(out, prev, self.cos_max, u, p.direction == "sample")
            if step == 0:
                first[rows] = d
            new = pos + p.step_size * d
            go = alive & ok & (torch.sigmoid(eos) < p.eos_threshold) & (count[rows] < budget[rows])
            go &= self.stop.inside(new) & (self.stop(new)[:, 0] > p.stop_threshold)
            grow = rows[go]
            if grow.numel() == 0:
                break
            need = int(count[grow].max().item()) + 1
            if need > pts.shape[1]:
                extra = max(need, 2 * pts.shape[1]) - pts.shape[1]
                pts = torch.cat([pts, torch.zeros(b, extra, 3, device=self.device)], dim=1)
            pts[grow, count[grow]] = new[go]
            count[grow] += 1
            alive = go
            pos = torch.where(go[:, None], new, pos)
            prev = torch.where(go[:, None], d, prev)
            if int(grow.numel()) < len(rows) // 2:
                keep = go.nonzero().squeeze(-1)
                state = model.select(state, keep)
                rows, alive, pos, prev = rows[keep], alive[keep], pos[keep], prev[keep]
                rows_np = rows.cpu().numpy()
        return pts, count, first

    def _replay(self, pts, count):
        """Read each forward half from its far end back to (not including) the seed; returns the
        network state there and the direction of arrival at the seed."""
        b = pts.shape[0]
        state = self.model.init_state(b, self.device)
        n_tokens = count - 1
        rows = torch.arange(b, device=self.device)
        for t in range(int(n_tokens.max().item()) if b else 0):
            valid = t < n_tokens
            idx = (count - 1 - t).clamp(min=0)
            here = pts[rows, idx]
            prev = torch.zeros_like(here) if t == 0 else _unit(here - pts[rows, (idx + 1).clamp(max=pts.shape[1] - 1)])
            _, _, state = self.model.step(self.features(here), prev * valid[:, None], state, valid)
        arrive = _unit(pts[:, 0] - pts[:, 1]) if pts.shape[1] > 1 else torch.zeros(b, 3, device=self.device)
        return state, arrive

    # ------------------------------------------------------------------ a chunk
    @torch.inference_mode()
    def run(self, seeds_world: np.ndarray, seed_index: np.ndarray):
        """Track from world seed points; returns (positions (M, 3) float32 world mm, lengths (k,),
        kept (k,) indices into the seeds) for the streamlines of at least ``min_length``."""
        p = self.params
        b = len(seeds_world)
        with np.errstate(over="ignore"):
            keys = stream_key(np.int64(p.rng_seed), np.asarray(seed_index, dtype=np.int64)).astype(np.uint64)
        start = torch.as_tensor(np.asarray(seeds_world, dtype=np.float32), device=self.device)
        full = torch.full((b,), p.max_points, dtype=torch.long, device=self.device)
        fw, fw_n, first = self._half(start, torch.zeros(b, 3, device=self.device), keys,
                                     self.model.init_state(b, self.device), full, stream=0)
        state, arrive = self._replay(fw, fw_n)
        prev = torch.where((fw_n > 1)[:, None], arrive, -first)
        bw, bw_n, _ = self._half(start, prev, keys, state, full - fw_n + 1, stream=1)
        return join(fw.cpu().numpy(), fw_n.cpu().numpy(), bw.cpu().numpy(), bw_n.cpu().numpy(), p.min_points)


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def join(fw, fw_n, bw, bw_n, min_points: int):
    """Backward half reversed (without its seed point), then the forward half, for every seed;
    only streamlines of at least ``min_points`` points are kept."""
    total = fw_n + bw_n - 1
    kept = np.flatnonzero(total >= min_points)
    lengths = total[kept].astype(np.int64)
    out = np.empty((int(lengths.sum()), 3), dtype=np.float32)
    at = 0
    for i in kept:
        nb, nf = int(bw_n[i]), int(fw_n[i])
        out[at:at + nb - 1] = bw[i, nb - 1:0:-1]
        out[at + nb - 1:at + nb - 1 + nf] = fw[i, :nf]
        at += nb + nf - 1
    return out, lengths, kept.astype(np.int64)
