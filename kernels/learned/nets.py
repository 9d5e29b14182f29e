"""The learned trackers' networks (PyTorch): a recurrent and a transformer model, two output heads.

Both read, at each point of a streamline, the input features (:class:`~.modelfile.InputSpec`) and
the previous step's direction, and output the next direction (a head) and an end-of-streamline
logit.  Training runs whole sequences at once (:meth:`forward`); tracking advances every streamline
of a batch by one point at a time (:meth:`step`) with a state: the GRU's hidden vectors, or the
transformer's keys and values of the points so far (a cache, so a step costs one token).  A step
marked not ``valid`` leaves a streamline's state as it was: batches of sequences of different
lengths replay together.

* ``gru``: embedding -> stacked GRU (Learn2track-like).
* ``transformer``: embedding + sinusoidal position -> pre-norm blocks of causal multi-head
  self-attention and an MLP (TractoTransformer-like, decoder only).
* heads: ``sphere`` (softmax over the directions of a sphere, trained on targets smoothed over
  neighbouring directions) and ``vmf`` (von Mises-Fisher: mean direction and concentration,
  trained by its negative log-likelihood).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modelfile import Architecture, InputSpec

TARGET_KAPPA = 40.0          # sphere head: targets are exp(kappa cos) over the sphere (~9 deg wide)
REFINE_COS = math.cos(math.radians(15))   # sphere head "max": mean of directions within 15 deg of the peak
MIN_CONE_MASS = 0.05         # sphere head: stop when less than this probability lies within max angle
KAPPA_MAX = 2000.0


def sphere_directions(name: str) -> np.ndarray:
    """Unit vertices (V, 3) of a full dipy sphere (both hemispheres: directions are signed)."""
    from dipy.data import get_sphere
    v = np.asarray(get_sphere(name=name).vertices, dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Embedding(nn.Module):
    """Standardised features and the previous direction -> hidden vector."""

    def __init__(self, n_features: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.linear = nn.Linear(n_features + 3, hidden)

    def set_standardisation(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.scale.copy_(1.0 / (torch.as_tensor(std, dtype=torch.float32) + 1e-3))

    def forward(self, feat, prev):
        return F.gelu(self.linear(torch.cat([(feat - self.mean) * self.scale, prev], dim=-1)))


# ----------------------------------------------------------------------------- heads
class SphereHead(nn.Module):
    def __init__(self, hidden: int, dirs: np.ndarray):
        super().__init__()
        self.register_buffer("dirs", torch.as_tensor(dirs, dtype=torch.float32))
        self.linear = nn.Linear(hidden, len(dirs))
        # each direction's neighbours within the refinement angle (padded with itself, weight 0)
        close = np.asarray(dirs) @ np.asarray(dirs).T >= REFINE_COS
        width = int(close.sum(1).max())
        near = np.tile(np.arange(len(dirs))[:, None], (1, width))
        use = np.zeros((len(dirs), width), np.float32)
        for i, row in enumerate(close):
            idx = np.flatnonzero(row)
            near[i, :len(idx)], use[i, :len(idx)] = idx, 1.0
        self.register_buffer("near", torch.as_tensor(near), persistent=False)
        self.register_buffer("near_use", torch.as_tensor(use), persistent=False)

    def forward(self, h):
        return self.linear(h)

    def loss(self, out, target):
        """Kullback-Leibler divergence from targets smoothed over the sphere (0 when the prediction
        is the smoothed target); per token."""
        log_soft = torch.log_softmax(TARGET_KAPPA * (target @ self.dirs.T), dim=-1)
        return (log_soft.exp() * (log_soft - torch.log_softmax(out, dim=-1))).sum(-1)

    def choose(self, out, prev, cos_max: float, u, sample: bool):
        """Next directions (B, 3) and whether each is acceptable (B,).  Only directions within the
        max angle of ``prev`` (zero rows: any) are candidates; ``u`` (B, 2) uniforms."""
        p = torch.softmax(out, dim=-1)
        has_prev = prev.abs().sum(-1) > 0
        cone = ((prev @ self.dirs.T) >= cos_max) | ~has_prev[:, None]
        p = p * cone
        mass = p.sum(-1)
        ok = mass >= MIN_CONE_MASS
        if sample:
            cdf = torch.cumsum(p, dim=-1)
            k = torch.searchsorted(cdf, (u[:, :1] * mass[:, None]).contiguous()).squeeze(-1)
            k = k.clamp(max=p.shape[1] - 1)
            d = self.dirs[k]
        else:
            k = torch.argmax(p, dim=-1)
            nb = self.near[k]                                        # (B, m)
            w = p.gather(1, nb) * self.near_use[k]
            d = (w[..., None] * self.dirs[nb]).sum(1)
            d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return d, ok


class VmfHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 4)

    def forward(self, h):
        return self.linear(h)

    @staticmethod
    def split(out):
        mu = out[..., :3] / out[..., :3].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        kappa = (F.softplus(out[..., 3]) + 1.0).clamp(max=KAPPA_MAX)
        return mu, kappa

    def loss(self, out, target):
        """Negative log-likelihood of the von Mises-Fisher distribution on the sphere; per token."""
        mu, k = self.split(out)
        log_norm = torch.log(k) - math.log(2 * math.pi) - k - torch.log1p(-torch.exp(-2 * k))
        return -(log_norm + k * (mu * target).sum(-1))

    def choose(self, out, prev, cos_max: float, u, sample: bool):
        mu, k = self.split(out)
        d = mu
        if sample:   # Wood (1994) for the 3D case: the cosine w to mu, then a uniform azimuth
            u1 = u[:, 0].clamp(1e-12, 1.0)
            w = 1.0 + torch.log(u1 + (1 - u1) * torch.exp(-2 * k)) / k
            ref = torch.where((mu[:, :1].abs() < 0.9), torch.tensor([1.0, 0.0, 0.0], device=mu.device),
                              torch.tensor([0.0, 1.0, 0.0], device=mu.device))
            e1 = F.normalize(ref - (ref * mu).sum(-1, keepdim=True) * mu, dim=-1)
            e2 = torch.cross(mu, e1, dim=-1)
            phi = 2 * math.pi * u[:, 1]
            s = torch.sqrt((1 - w * w).clamp_min(0))[:, None]
            d = w[:, None] * mu + s * (torch.cos(phi)[:, None] * e1 + torch.sin(phi)[:, None] * e2)
        has_prev = prev.abs().sum(-1) > 0
        ok = ((d * prev).sum(-1) >= cos_max) | ~has_prev
        return d, ok


def make_head(arch: Architecture):
    if arch.head == "sphere":
        return SphereHead(arch.hidden, sphere_directions(arch.sphere))
    return VmfHead(arch.hidden)


# ----------------------------------------------------------------------------- networks
class GruTracker(nn.Module):
    """Learn2track-like: a stacked GRU over the points of the streamline."""

    def __init__(self, inputs: InputSpec, arch: Architecture):
        super().__init__()
        self.embed = Embedding(inputs.n_features, arch.hidden)
        self.rnn = nn.GRU(arch.hidden, arch.hidden, arch.layers, batch_first=True)
        self.head = make_head(arch)
        self.eos = nn.Linear(arch.hidden, 1)
        self.arch = arch

    def forward(self, feat, prev):
        """(B, T, F), (B, T, 3) -> head output (B, T, ...), end-of-streamline logits (B, T)."""
        h, _ = self.rnn(self.embed(feat, prev))
        return self.head(h), self.eos(h).squeeze(-1)

    def init_state(self, batch: int, device):
        return torch.zeros(self.arch.layers, batch, self.arch.hidden, device=device)

    def step(self, feat, prev, state, valid=None):
        h, new = self.rnn(self.embed(feat, prev)[:, None, :], state)
        if valid is not None:
            new = torch.where(valid[None, :, None], new, state)
        h = h[:, 0]
        return self.head(h), self.eos(h).squeeze(-1), new

    @staticmethod
    def select(state, idx):
        return state[:, idx]


def positions(pos, dim: int):
    """Sinusoidal encoding (..., dim) of integer positions."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[..., None] * freq
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        return (z.reshape(shape).transpose(1, 2) for z in (q, k, v))     # (B, H, T, dh)

    def forward(self, x):
        q, k, v = self._qkv(x)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def step(self, x, cache_k, cache_v, slot: int, keys):
        """One token per sequence: x (B, d); its key and value go to ``slot`` of the caches
        (B, H, T, dh); ``keys`` (B, slot + 1) says which cached tokens may be attended to."""
        q, k, v = self._qkv(x[:, None, :])
        cache_k[:, :, slot] = k[:, :, 0]
        cache_v[:, :, slot] = v[:, :, 0]
        kk, vv = cache_k[:, :, :slot + 1], cache_v[:, :, :slot + 1]
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])          # (B, H, 1, slot+1)
        scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
        a = torch.softmax(scores, dim=-1) @ vv                                 # (B, H, 1, dh)
        x = x + self.proj(a[:, :, 0].reshape(x.shape))
        return x + self.mlp(self.norm2(x))


class TransformerTracker(nn.Module):
    """TractoTransformer-like: causal self-attention over the points of the streamline so far."""

    def __init__(self, inputs: InputSpec, arch: Architecture):
        super().__init__()
        self.embed = Embedding(inputs.n_features, arch.hidden)
        self.blocks = nn.ModuleList(Block(arch.hidden, arch.heads) for _ in range(arch.layers))
        self.norm = nn.LayerNorm(arch.hidden)
        self.head = make_head(arch)
        self.eos = nn.Linear(arch.hidden, 1)
        self.arch = arch

    def forward(self, feat, prev):
        x = self.embed(feat, prev)
        x = x + positions(torch.arange(x.shape[1], device=x.device), x.shape[-1])
        for blk in self.blocks:
            x = blk(x)
        h = self.norm(x)
        return self.head(h), self.eos(h).squeeze(-1)

    def init_state(self, batch: int, device, capacity: int = 64):
        a = self.arch
        shape = (batch, a.heads, capacity, a.hidden // a.heads)
        return {"k": [torch.zeros(shape, device=device) for _ in range(a.layers)],
                "v": [torch.zeros(shape, device=device) for _ in range(a.layers)],
                "keys": torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                "pos": torch.zeros(batch, dtype=torch.long, device=device), "slot": 0}

    @staticmethod
    def _grow(state):
        cap = state["keys"].shape[1]
        for name in ("k", "v"):
            state[name] = [torch.cat([c, torch.zeros_like(c)], dim=2) for c in state[name]]
        state["keys"] = torch.cat([state["keys"], torch.zeros_like(state["keys"])], dim=1)
        assert state["keys"].shape[1] == 2 * cap

    def step(self, feat, prev, state, valid=None):
        slot = state["slot"]
        if slot == state["keys"].shape[1]:
            self._grow(state)
        b = feat.shape[0]
        valid = torch.ones(b, dtype=torch.bool, device=feat.device) if valid is None else valid
        x = self.embed(feat, prev) + positions(state["pos"], self.arch.hidden)
        keys = state["keys"][:, :slot + 1].clone()
        keys[:, slot] = True              # a token always sees itself (an invalid one is discarded)
        for blk, ck, cv in zip(self.blocks, state["k"], state["v"]):
            x = blk.step(x, ck, cv, slot, keys)
        state["keys"][:, slot] = valid
        state["pos"] = state["pos"] + valid.long()
        state["slot"] = slot + 1
        h = self.norm(x)
        return self.head(h), self.eos(h).squeeze(-1), state

    @staticmethod
    def select(state, idx):
        return {"k": [c[idx] for c in state["k"]], "v": [c[idx] for c in state["v"]],
                "keys": state["keys"][idx], "pos": state["pos"][idx], "slot": state["slot"]}


def build_network(inputs: InputSpec, arch: Architecture) -> nn.Module:
    cls = GruTracker if arch.kind == "gru" else TransformerTracker
    return cls(inputs, arch)
