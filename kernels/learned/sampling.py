"""Trilinear interpolation of volumes at world points, on the tracking device (PyTorch).

Used for the network's inputs (the signal's SH coefficients at a point and its neighbours, in
training and in tracking alike) and for the stopping map.  Positions are world mm; the affine maps
them into the grid, so oblique and anisotropic images need nothing special.  Outside the grid the
volume is zero.
"""
from __future__ import annotations

import numpy as np
import torch

from .modelfile import InputSpec

_CORNERS = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]


class VolumeSampler:
    """A (X, Y, Z[, C]) volume and its voxel -> world affine; ``sampler(points)`` interpolates."""

    def __init__(self, volume, affine, device="cpu"):
        vol = np.asarray(volume, dtype=np.float32)
        if vol.ndim == 3:
            vol = vol[..., None]
        if vol.ndim != 4:
            raise ValueError(f"expected a 3D or 4D volume, got shape {vol.shape}")
        self.shape = tuple(vol.shape[:3])
        self.channels = vol.shape[3]
        self.device = torch.device(device)
        self.flat = torch.as_tensor(np.ascontiguousarray(vol.reshape(-1, self.channels)), device=self.device)
        inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
        self.rot = torch.as_tensor(inv[:3, :3], dtype=torch.float32, device=self.device)
        self.shift = torch.as_tensor(inv[:3, 3], dtype=torch.float32, device=self.device)
        self.dims = torch.as_tensor(self.shape, device=self.device)
        self.strides = torch.as_tensor([self.shape[1] * self.shape[2], self.shape[2], 1], device=self.device)

    def voxel(self, points):
        return points @ self.rot.T + self.shift

    def inside(self, points):
        """True where the point lies within the grid's outer voxel centres."""
        v = self.voxel(points)
        return ((v >= 0) & (v <= self.dims - 1)).all(-1)

    def __call__(self, points):
        """(N, 3) world mm -> (N, C)."""
        v = self.voxel(points)
        base = torch.floor(v)
        frac = v - base
        base = base.long()
        out = torch.zeros(points.shape[0], self.channels, device=self.device)
        for corner in _CORNERS:
            off = torch.as_tensor(corner, device=self.device)
            idx = base + off
            w = torch.where(off.bool(), frac, 1.0 - frac).prod(-1)
            ok = ((idx >= 0) & (idx < self.dims)).all(-1)
            lin = torch.where(ok, (idx * self.strides).sum(-1), 0)
            out += (w * ok)[:, None] * self.flat[lin]
        return out


class SignalFeatures:
    """The network's inputs at world points: the signal's coefficients at each point and at the
    neighbourhood offsets of ``spec``, concatenated (N, n_features)."""

    def __init__(self, signal, affine, spec: InputSpec, device="cpu"):
        if np.asarray(signal).shape[-1] != spec.n_coefficients:
            raise ValueError(f"signal has {np.asarray(signal).shape[-1]} coefficients, the model reads "
                             f"{spec.n_coefficients} (SH order {spec.sh_order})")
        self.sampler = VolumeSampler(signal, affine, device)
        self.offsets = torch.as_tensor(spec.offsets, dtype=torch.float32, device=self.sampler.device)

    def __call__(self, points):
        n = points.shape[0]
        pts = (points[:, None, :] + self.offsets[None]).reshape(-1, 3)
        return self.sampler(pts).reshape(n, -1)
