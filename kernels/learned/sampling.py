"""Trilinear interpolation of volumes at world points, on the tracking device (PyTorch).

Used for the network's inputs (the signal's SH coefficients at a point and its neighbours, in
training and in tracking alike) and for the stopping map.  Positions are world mm; the affine maps
them into the grid, so oblique and anisotropic images need nothing special.  Outside the grid the
volume is zero.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .modelfile import InputSpec


class VolumeSampler:
    """A (X, Y, Z[, C]) volume and its voxel -> world affine; ``sampler(points)`` interpolates
    (PyTorch's ``grid_sample``, trilinear, zero outside the grid)."""

    def __init__(self, volume, affine, device="cpu"):
        vol = np.asarray(volume, dtype=np.float32)
        if vol.ndim == 3:
            vol = vol[..., None]
        if vol.ndim != 4:
            raise ValueError(f"expected a 3D or 4D volume, got shape {vol.shape}")
        self.shape = tuple(vol.shape[:3])
        self.channels = vol.shape[3]
        self.device = torch.device(device)
        # (1, C, X, Y, Z): grid_sample's depth, height and width are the voxel axes i, j, k
        self.volume = torch.as_tensor(np.ascontiguousarray(np.moveaxis(vol, 3, 0))[None], device=self.device)
        inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
        self.rot = torch.as_tensor(inv[:3, :3], dtype=torch.float32, device=self.device)
        self.shift = torch.as_tensor(inv[:3, 3], dtype=torch.float32, device=self.device)
        self.dims = torch.as_tensor(self.shape, dtype=torch.float32, device=self.device)

    def voxel(self, points):
        return points @ self.rot.T + self.shift

    def inside(self, points):
        """True where the point lies within the grid's outer voxel centres."""
        v = self.voxel(points)
        return ((v >= 0) & (v <= self.dims - 1)).all(-1)

    def __call__(self, points):
        """(N, 3) world mm -> (N, C)."""
        grid = (2.0 * self.voxel(points) / (self.dims - 1).clamp_min(1.0) - 1.0).flip(-1)   # (k, j, i) in [-1, 1]
        out = F.grid_sample(self.volume, grid[None, None, None], mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out[0, :, 0, 0].T


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
