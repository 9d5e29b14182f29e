"""Spatio-angular parametric continuous convolution networks (PCCNN, Lyon et al., NeurIPS 2023).

A parametric continuous convolution (PCConv) maps features sampled at one set of q-space points
(and a spatial patch) to another set of q-space points.  Its kernel is not a table of weights but a
small network (the *weight net*) evaluated at the relative position of every (input point, output
point, spatial offset) triple: the spatial offset inside the kernel (3 numbers in [0, 1]), the
angular distance of the two gradient directions (antipodally symmetric, radians) and a b-value
term (``diff``: b_out - b_in; ``both``: b_in and b_out; in units of 1000 s/mm^2), each expanded
into sine/cosine Fourier features.  The weight net gives one weight per input channel (a depthwise
kernel); a linear layer then mixes the channels.  Input points farther than ``d_max`` radians from an
output point, or beyond its ``k_max`` nearest, do not contribute.

The parameter names (``pccnn.pcconv_in.weight_net.layers.0.weight`` ...) and the computation follow
the published reference implementation (the ``dmri-pcconv`` package, MIT licence), so its published
weights load here unchanged; the computation is rewritten with ``einsum`` so the (voxels x q_out x
kernel x q_in x channels) product is never materialised, and shapes are derived per call (the
reference caches them at the first call).  ``Hyper`` holds the layer sizes: ``Hyper()`` are the
published ones; tractoscale's demo model uses a much smaller set.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

BVAL_UNIT = 1000.0    # b-values enter the network in units of 1000 s/mm^2


@dataclass(frozen=True)
class Block:
    """Sizes of one stage: ``num`` blocks, channel split ``out1`` (pointwise) + ``out3`` (3x3x3
    factorised), weight-net hidden layers ``hidden`` and Fourier degree ``lnum``."""

    num: int
    out1: int
    out3: int
    hidden: tuple
    lnum: int


@dataclass(frozen=True)
class Conv:
    """Sizes of one pointwise PCConv: output channels ``out`` (0: fixed by the network), weight-net
    hidden layers and Fourier degree."""

    hidden: tuple
    lnum: int
    out: int = 0


@dataclass(frozen=True)
class Hyper:
    """Layer sizes of a PCCNN (defaults: the published model)."""

    in_blocks: Block = Block(3, 128, 128, (128, 32), 5)
    out_blocks: Block = Block(5, 128, 32, (16, 16), 15)
    pcconv_in: Conv = Conv((64, 64), 15)
    pcconv_mid: Conv = Conv((32, 256), 15)
    pcconv_out1: Conv = Conv((32, 64), 15, out=64)
    pcconv_out2: Conv = Conv((256, 256), 10)
    bval_mode: str = "diff"            # "diff" (PCCNN) or "both" (PCCNN-Bv)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Hyper:
        d = dict(d)
        kw = {}
        for k in ("in_blocks", "out_blocks"):
            if k in d:
                b = dict(d.pop(k))
                b["hidden"] = tuple(b["hidden"])
                kw[k] = Block(**b)
        for k in ("pcconv_in", "pcconv_mid", "pcconv_out1", "pcconv_out2"):
            if k in d:
                c = dict(d.pop(k))
                c["hidden"] = tuple(c["hidden"])
                kw[k] = Conv(**c)
        if "bval_mode" in d:
            kw["bval_mode"] = str(d.pop("bval_mode"))
        if d:
            raise ValueError(f"unknown hyper-parameters {sorted(d)}")
        return cls(**kw)


# tractoscale's demo model (about 25 thousand parameters; trains in minutes on two cores)
DEMO_HYPER = Hyper(in_blocks=Block(1, 8, 8, (16, 16), 3), out_blocks=Block(2, 8, 8, (16, 16), 3),
                   pcconv_in=Conv((16, 16), 3), pcconv_mid=Conv((16, 16), 3),
                   pcconv_out1=Conv((16, 16), 3, out=16), pcconv_out2=Conv((16, 16), 3))


class WeightNet(nn.Module):
    """MLP on Fourier features of the kernel coordinates -> one weight per input channel."""

    def __init__(self, *sizes: int, ndims: int, lnum: int):
        super().__init__()
        self.ndims, self.lnum = ndims, lnum
        layers, n_in = [], ndims * 2 * lnum
        for k, n in enumerate(sizes):
            layers.append(nn.Linear(n_in, n))
            layers.append(nn.LeakyReLU(0.1) if k < len(sizes) - 1 else nn.Identity())
            n_in = n
        self.layers = nn.Sequential(*layers)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        # features ordered (degree, [sin, cos], coordinate), as the published weights expect
        freq = (2.0 ** torch.arange(self.lnum, device=coords.device, dtype=coords.dtype)) * math.pi
        arg = freq[:, None] * coords[..., None, :]                       # (..., lnum, d)
        feats = torch.stack([torch.sin(arg), torch.cos(arg)], dim=-2)     # (..., lnum, 2, d)
        return self.layers(feats.flatten(-3))


def angular_coords(q_in: torch.Tensor, q_out: torch.Tensor, bval_mode: str, d_max: float, k_max: int):
    """Kernel coordinates and mask between input and output q-space points.

    ``q_in`` (B, I, 3), ``q_out`` (B, O, 3): gradient directions scaled by b / 1000.  Returns
    coordinates (B, O, I, 2 or 3) [angular distance, b-value term(s)] and a 0/1 mask (B, O, I).
    """
    n_in = torch.linalg.vector_norm(q_in, dim=-1, keepdim=True)
    n_out = torch.linalg.vector_norm(q_out, dim=-1, keepdim=True)
    u_in = torch.nan_to_num(q_in / n_in)
    u_out = torch.nan_to_num(q_out / n_out)
    dot = torch.einsum("boc,bic->boi", u_out, u_in)
    dist = torch.minimum(torch.acos(dot.clamp(-1, 1)), torch.acos((-dot).clamp(-1, 1)))   # antipodal
    mask = dist <= d_max
    if 0 < k_max < dist.shape[-1]:
        rank = dist.argsort(dim=-1, stable=True).argsort(dim=-1)
        mask = mask & (rank < k_max)
    b_in = n_in[..., 0][:, None, :].expand_as(dist)
    b_out = n_out[..., 0][:, :, None].expand_as(dist)
    if bval_mode == "diff":
        coords = torch.stack([dist, b_out - b_in], dim=-1)
    else:
        coords = torch.stack([dist, b_in, b_out], dim=-1)
    return coords, mask.to(dist.dtype)


class PCConv(nn.Module):
    """Parametric continuous convolution over a spatial kernel ``kernel`` (1 or 3 per axis, 'same'
    zero padding) and q-space.  Features: (B, X, Y, Z, Q, C)."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), *, hidden=(32, 64), lnum=5,
                 k_max: int = 0, d_max: float = 1.0, bval_mode: str = "diff", weight_net=None,
                 feature_layer=None, bias=True):
        super().__init__()
        assert d_max <= math.pi / 2
        self.kernel = tuple(int(k) for k in kernel)
        self.k_max, self.d_max, self.bval_mode = int(k_max), float(d_max), bval_mode
        self.n_ang = 2 if bval_mode == "diff" else 3
        self.weight_net = weight_net if weight_net is not None else WeightNet(
            *hidden, in_channels, ndims=3 + self.n_ang, lnum=lnum)
        self.feature_layer = feature_layer if feature_layer is not None else nn.Linear(
            in_channels, out_channels, bias=False)
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        elif bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.bias = None

    def _spatial_offsets(self, like: torch.Tensor) -> torch.Tensor:
        axes = [torch.linspace(0, 1, k, device=like.device, dtype=like.dtype) if k > 1
                else torch.zeros(1, device=like.device, dtype=like.dtype) for k in self.kernel]
        return torch.cartesian_prod(*axes).reshape(-1, 3)               # (S, 3), x-major

    def _pad_unfold(self, f):
        """(B,X,Y,Z,I,C) -> (B,X,Y,Z,I,C,S): the kernel's neighbourhood of every voxel, zero padded."""
        pad = []
        for k in reversed(self.kernel):
            pad += [(k - 1) // 2, k - 1 - (k - 1) // 2]
        fp = nn.functional.pad(f, (0, 0, 0, 0) + tuple(pad))
        for ax, k in enumerate(self.kernel):
            fp = fp.unfold(ax + 1, k, 1)                                   # (B,X,Y,Z,I,C,kx,ky,kz)
        return fp.flatten(-3)

    def _forward_nearest(self, ang, mask, f, same: bool):
        """k_max = 1: each output point reads its single nearest input point (gathered, not a dense sum
        with all other weights masked out: the same result in O(q) instead of O(q^2)).  ``same``: the
        output points are the input points, each its own nearest (also when two shells share a
        direction, where the nearest by angle alone is ambiguous)."""
        b, o, i, na = ang.shape
        if same:
            sel = torch.arange(o, device=ang.device).expand(b, o)
        else:
            sel = ang[..., 0].masked_fill(mask == 0, float("inf")).argmin(-1)    # (B,O)
        keep = mask.gather(-1, sel[..., None])[..., 0]                       # 0 where nothing is in range
        a = ang.gather(2, sel[:, :, None, None].expand(b, o, 1, na))[:, :, 0]   # (B,O,a)
        sp = self._spatial_offsets(ang)
        s = sp.shape[0]
        coords = torch.cat([sp[None, None].expand(b, o, s, 3), a[:, :, None].expand(b, o, s, na)], dim=-1)
        w = self.weight_net(coords) * keep[:, :, None, None]                 # (B,O,S,C)
        if not same:                                                         # (B,X,Y,Z,O,C)
            f = f.gather(4, sel[:, None, None, None, :, None].expand(-1, *f.shape[1:4], o, f.shape[5]))
        if s == 1:
            return f * w[:, None, None, None, :, 0]
        # a sum of shifted copies: no (voxels x kernel) unfolded array
        pad = []
        for k in reversed(self.kernel):
            pad += [(k - 1) // 2, k - 1 - (k - 1) // 2]
        fp = nn.functional.pad(f, (0, 0, 0, 0) + tuple(pad))
        nx, ny, nz = f.shape[1:4]
        out = None
        for n, (dx, dy, dz) in enumerate(itertools.product(*(range(k) for k in self.kernel))):
            term = fp[:, dx:dx + nx, dy:dy + ny, dz:dz + nz] * w[:, None, None, None, :, n]
            out = term if out is None else out + term
        return out

    def forward(self, q_in, q_out, f):
        ang, mask = angular_coords(q_in, q_out, self.bval_mode, self.d_max, self.k_max)   # (B,O,I,a), (B,O,I)
        if self.k_max == 1:
            out = self._forward_nearest(ang, mask, f, q_in is q_out)
            out = self.feature_layer(out)
            return out + self.bias if self.bias is not None else out
        sp = self._spatial_offsets(ang)
        b, o, i, _ = ang.shape
        s = sp.shape[0]
        coords = torch.cat([sp[None, None, :, None, :].expand(b, o, s, i, 3),
                            ang[:, :, None].expand(b, o, s, i, ang.shape[-1])], dim=-1)   # (B,O,S,I,3+a)
        w = self.weight_net(coords) * mask[:, :, None, :, None]           # (B,O,S,I,C)
        if s == 1:
            out = torch.einsum("bxyzic,boic->bxyzoc", f, w[:, :, 0])
        else:
            out = torch.einsum("bxyzics,bosic->bxyzoc", self._pad_unfold(f), w)
        out = self.feature_layer(out)
        if self.bias is not None:
            out = out + self.bias
        return out


class PCConvFactorised(nn.Module):
    """A 3x3x3 PCConv factorised into three 1D spatial passes (each q-space point with itself) and a
    pointwise angular pass, all four sharing one weight net."""

    def __init__(self, in_channels: int, out_channels: int, kernel_len: int = 3, *, hidden=(32, 64), lnum=5,
                 k_max: int = 0, d_max: float = 1.0, bval_mode: str = "diff"):
        super().__init__()
        n_ang = 2 if bval_mode == "diff" else 3
        self.weightnet = WeightNet(*hidden, in_channels, ndims=3 + n_ang, lnum=lnum)
        self.feature_layer = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        common = dict(weight_net=self.weightnet, bval_mode=bval_mode)
        self.pcconv1 = PCConv(in_channels, in_channels, (kernel_len, 1, 1), k_max=1, feature_layer=nn.Identity(),
                              bias=False, **common)
        self.pcconv2 = PCConv(in_channels, in_channels, (1, kernel_len, 1), k_max=1, feature_layer=nn.Identity(),
                              bias=False, **common)
        self.pcconv3 = PCConv(in_channels, in_channels, (1, 1, kernel_len), k_max=1, feature_layer=nn.Identity(),
                              bias=False, **common)
        self.pcconv4 = PCConv(in_channels, out_channels, (1, 1, 1), k_max=k_max, d_max=d_max,
                              feature_layer=self.feature_layer, bias=self.bias, **common)

    def spatial(self, q_in, f):
        """The three spatial passes (they see the input points only)."""
        return self.pcconv3(q_in, q_in, self.pcconv2(q_in, q_in, self.pcconv1(q_in, q_in, f)))

    def forward(self, q_in, q_out, f, spatial=None):
        return self.pcconv4(q_in, q_out, self.spatial(q_in, f) if spatial is None else spatial)


class PCConvBlock(nn.Module):
    """Pointwise and factorised 3x3x3 PCConvs side by side, concatenated, with a residual."""

    def __init__(self, conv_in: int, b: Block, residual: bool, bval_mode: str):
        super().__init__()
        self.residual = residual
        self.relu = nn.ReLU()
        self.pcconv1 = PCConv(conv_in, b.out1, (1, 1, 1), hidden=b.hidden, lnum=b.lnum, bval_mode=bval_mode)
        self.pcconv3 = PCConvFactorised(conv_in, b.out3, 3, hidden=b.hidden, lnum=b.lnum, bval_mode=bval_mode)

    def forward(self, q_in, q_out, f, spatial=None):
        out = torch.cat([self.relu(self.pcconv1(q_in, q_out, f)),
                         self.relu(self.pcconv3(q_in, q_out, f, spatial))], dim=-1)
        return self.relu(out + f) if self.residual else self.relu(out)


class PCCNN(nn.Module):
    """Signal at q_in points of a patch -> signal at q_out points of the same patch.

    ``forward(signal (B, X, Y, Z, I), q_in (B, I, 3), q_out (B, O, 3)) -> (B, X, Y, Z, O)``, signals
    normalised per shell (see :mod:`.predict`), q-space points = unit direction x b / 1000.
    """

    def __init__(self, hyper: Hyper | None = None):
        super().__init__()
        h = hyper or Hyper()
        self.hyper = h
        m = h.bval_mode
        c_in = h.in_blocks.out1 + h.in_blocks.out3
        c_out = h.out_blocks.out1 + h.out_blocks.out3
        self.relu = nn.ReLU()
        self.pcconv_in = PCConv(1, c_in, hidden=h.pcconv_in.hidden, lnum=h.pcconv_in.lnum, bval_mode=m)
        self.in_blocks = nn.ModuleList(PCConvBlock(c_in, h.in_blocks, True, m) for _ in range(h.in_blocks.num))
        self.pcconv_mid = PCConv(c_in, c_out, hidden=h.pcconv_mid.hidden, lnum=h.pcconv_mid.lnum, bval_mode=m)
        self.out_blocks = nn.ModuleList(PCConvBlock(c_out, h.out_blocks, k != 0, m)
                                        for k in range(h.out_blocks.num))
        self.pcconv_out1 = PCConv(c_out, h.pcconv_out1.out, hidden=h.pcconv_out1.hidden, lnum=h.pcconv_out1.lnum,
                                  bval_mode=m)
        self.pcconv_out2 = PCConv(h.pcconv_out1.out, 1, hidden=h.pcconv_out2.hidden, lnum=h.pcconv_out2.lnum,
                                  bval_mode=m)

    def encode(self, signal, q_in):
        """The part that sees only the input points, computed once for any number of output points:
        ``(features, spatial passes of the first output block)``."""
        a = self.relu(self.pcconv_in(q_in, q_in, signal[..., None]))
        for blk in self.in_blocks:
            a = blk(q_in, q_in, a)
        a = self.relu(self.pcconv_mid(q_in, q_in, a))
        return a, self.out_blocks[0].pcconv3.spatial(q_in, a)

    def forward(self, signal, q_in, q_out):
        return self.decode(self.encode(signal, q_in), q_in, q_out)

    def decode(self, encoded, q_in, q_out):
        a, spatial = encoded
        for k, blk in enumerate(self.out_blocks):
            a = blk(q_in, q_out, a, spatial) if k == 0 else blk(q_out, q_out, a)
        a = self.relu(self.pcconv_out1(q_out, q_out, a))
        return self.pcconv_out2(q_out, q_out, a)[..., 0]


class PCCNNModule(nn.Module):
    """The top-level module of a checkpoint: parameters under ``pccnn.`` as in the published files."""

    def __init__(self, hyper: Hyper | None = None):
        super().__init__()
        self.pccnn = PCCNN(hyper)

    def forward(self, signal, q_in, q_out):
        return self.pccnn(signal, q_in, q_out)
