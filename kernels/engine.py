"""Host side of tractography: prepare arrays, place seeds, run chunks on CPU or CUDA.

Typical use::

    data = prepare(sh=sh, affine=affine, stop_map=fa, params=TrackParams(step_size=1.0))
    tracker = Tracker(data, device="cpu")
    seeder = MaskSeeder(wm_mask, n_seeds=10000, rng_seed=1)
    for chunk in iter_chunks(tracker, seeder, chunk_size=5000):
        ...  # chunk.positions, chunk.lengths, chunk.seed_index, chunk.seed_points
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from . import tracking_core as core
from .sphere import hemisphere, neighbour_and_cone_table, sh_order_from_ncoef, sh_to_sf_matrix

log = logging.getLogger(__name__)

__all__ = ["TrackParams", "TrackingData", "prepare", "MaskSeeder", "PointSeeder", "Tracker", "Chunk",
           "iter_chunks", "track_all", "choose_odf_mode", "available_memory"]

ALGORITHMS = {"prob": core.ALGO_PROB, "det": core.ALGO_DET, "ptt": core.ALGO_PTT,
              "boot": core.ALGO_BOOT}
STOP_METHODS = {"threshold": core.STOP_THRESHOLD, "act": core.STOP_ACT, "cmc": core.STOP_CMC}


@dataclass
class TrackParams:
    """Tracking settings; lengths in mm, angles in degrees."""

    algorithm: str = "prob"
    step_size: float = 0.5
    max_angle: float = 30.0
    pmf_threshold: float = 0.1
    stop_method: str = "threshold"
    stop_threshold: float = 0.1
    rel_peak_threshold: float = 0.25
    min_separation_angle: float = 45.0
    min_length: float = 10.0
    max_length: float = 250.0
    max_cross: int = 1
    rng_seed: int = 0
    ptt_probe_length: float | None = None   # default: the smallest voxel size
    ptt_probe_points: int = 4
    ptt_max_tries: int = 50
    boot_max_tries: int = 5

    @property
    def max_points(self) -> int:
        return int(math.floor(self.max_length / self.step_size + 1e-9)) + 1

    @property
    def min_points(self) -> int:
        return max(2, int(math.ceil(self.min_length / self.step_size - 1e-9)) + 1)


@dataclass
class TrackingData:
    """Everything a kernel reads, as contiguous arrays."""

    odf: np.ndarray          # (X, Y, Z, V) float32 sampled ODF, or (X, Y, Z, K) SH coefficients
    odf_mode: str            # "sf" or "sh"
    bmat: np.ndarray         # (V, K) float32 SH -> sphere matrix ((1, 1) in sf mode)
    verts: np.ndarray        # (V, 3) float64 hemisphere, scaled-voxel-axis frame
    nbrs: np.ndarray         # (V, D + C) int32 neighbours then cone candidates
    stop: np.ndarray         # (X, Y, Z, C) float32: threshold map or include/exclude, then ODF max
    affine: np.ndarray       # (4, 4) float64 voxel -> world
    fp: np.ndarray
    ip: np.ndarray
    params: TrackParams = field(repr=False)
    bdata: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1, 1), np.float32), repr=False)
    bootm: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), np.float64), repr=False)

    @property
    def bytes_per_seed(self) -> int:
        return int(self.params.max_cross * self.params.max_points * 12 + 64)


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable), 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def pack_params(p: TrackParams, voxel_sizes, nverts: int, ncoef: int, maxdeg: int,
                odf_mode: str) -> tuple[np.ndarray, np.ndarray]:
    vs = np.asarray(voxel_sizes, dtype=np.float64)
    fp = np.zeros(16, dtype=np.float64)
    fp[0] = p.step_size
    fp[1] = math.cos(math.radians(p.max_angle))
    fp[2] = p.pmf_threshold
    fp[3] = p.stop_threshold
    fp[4] = p.rel_peak_threshold
    fp[5] = math.cos(math.radians(p.min_separation_angle))
    fp[6:9] = vs
    fp[9] = p.step_size / float(vs.mean())
    fp[10] = p.ptt_probe_length if p.ptt_probe_length else float(vs.min())
    fp[11] = math.radians(p.max_angle) / p.step_size
    ip = np.zeros(16, dtype=np.int64)
    ip[0] = ALGORITHMS[p.algorithm]
    ip[1] = 0 if odf_mode == "sf" else 1
    ip[2] = STOP_METHODS[p.stop_method]
    ip[3] = p.max_points
    ip[4] = p.max_cross
    ip[5] = nverts
    ip[6] = ncoef
    ip[7] = maxdeg
    ip[8] = int(p.rng_seed)
    ip[9] = p.ptt_probe_points
    ip[10] = p.ptt_max_tries
    ip[12] = p.boot_max_tries
    return fp, ip


def bootstrap_arrays(dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, sh_order: int,
                     model: str, mask: np.ndarray | None = None):
    """``bdata`` and ``bootm`` for the residual bootstrap (CSA or OPDT, one shell).

    ``bvecs`` are in the scaled-voxel-axis frame.  The lowest non-zero shell is used, as in the
    ODF fit.  Returns (bdata float32 (X, Y, Z, nd + 1), bootm float64 (2 nd + 2 K, nd), nd).
    """
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_tournier, smooth_pinv
    from scipy.special import eval_legendre

    from bids_app.models import B0_THRESHOLD, ODF_SMOOTH, shell_selection, shells

    if model not in ("csa", "opdt"):
        raise ValueError("the residual bootstrap supports the CSA and OPDT models")
    bvals = np.asarray(bvals, dtype=np.float64)
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise ValueError("the bootstrap needs at least one b=0 volume")
    sel = shell_selection(bvals, shells(bvals)[:1]) & ~b0     # the lowest shell, as the ODF fit uses
    nd = int(sel.sum())
    g = np.asarray(bvecs, dtype=np.float64)[sel]
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    _, theta, phi = cart2sphere(g[:, 0], g[:, 1], g[:, 2])
    bm, _m, lv = real_sh_tournier(sh_order, theta[:, None], phi[:, None], legacy=False)
    lap = -lv * (lv + 1.0)
    inv_b = smooth_pinv(bm, np.sqrt(ODF_SMOOTH) * lap)         # (K, nd)
    hat = bm @ inv_b                                              # (nd, nd)
    lev = np.clip(np.diag(hat), 0.0, 0.99)
    lcr = (np.eye(nd) - hat) / np.sqrt(1.0 - lev)[:, None]
    leg0 = eval_legendre(lv, 0.0)
    if model == "csa":
        m1 = (leg0 * lap)[:, None] / (8 * np.pi) * inv_b
        m2 = np.zeros_like(m1)
    else:
        m1 = (leg0 * lap)[:, None] * inv_b                        # delta_b
        m2 = 4 * leg0[:, None] * inv_b                            # delta_q
    bootm = np.ascontiguousarray(np.vstack([hat, lcr, m1, m2]), dtype=np.float64)
    data = np.asarray(dwi, dtype=np.float32)
    bdata = np.empty(data.shape[:3] + (nd + 1,), dtype=np.float32)
    bdata[..., :nd] = np.clip(data[..., sel], 1e-5, None)
    bdata[..., nd] = np.clip(data[..., b0].mean(axis=-1), 0, None)
    if mask is not None:
        bdata[~np.asarray(mask, dtype=bool)] = 0
    return bdata, bootm, nd


def sf_bytes(shape3, nverts: int) -> int:
    return int(np.prod(shape3)) * nverts * 4


def choose_odf_mode(requested: str, shape3, nverts: int, budget_bytes: int | None = None) -> str:
    """``sf`` (pre-sampled, fastest) when it fits in the budget, else ``sh`` (on the fly)."""
    if requested in ("sf", "sh"):
        return requested
    if budget_bytes is None:
        budget_bytes = min(available_memory() // 4, 8 << 30)
    return "sf" if sf_bytes(shape3, nverts) <= budget_bytes else "sh"


def prepare(*, sh: np.ndarray, affine: np.ndarray, params: TrackParams,
            stop_map: np.ndarray | None = None, include_map: np.ndarray | None = None,
            exclude_map: np.ndarray | None = None, mask: np.ndarray | None = None,
            odf_mode: str = "auto", sphere: str = "repulsion724",
            memory_budget: int | None = None, dwi=None, gtab=None,
            odf_model: str | None = None) -> TrackingData:
    """Arrays for the kernels from SH coefficients (tournier07, legacy=False, voxel frame).

    Threshold stopping uses ``stop_map`` (> ``params.stop_threshold`` keeps tracking; pass a 0/1
    mask with threshold 0.5 for mask stopping).  ACT/CMC use ``include_map`` / ``exclude_map``.
    """
    sh = np.asarray(sh)
    if sh.ndim != 4:
        raise ValueError("sh must be 4D (X, Y, Z, K)")
    affine = np.asarray(affine, dtype=np.float64)
    verts, nbrs = hemisphere(sphere)
    ncoef = sh.shape[3]
    order = sh_order_from_ncoef(ncoef)
    bmat = sh_to_sf_matrix(verts, order)
    mode = choose_odf_mode(odf_mode, sh.shape[:3], len(verts), memory_budget)
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    odfmax = np.zeros(sh.shape[:3], dtype=np.float32)
    odf = np.zeros(sh.shape[:3] + (len(verts),), dtype=np.float32) if mode == "sf" else None
    for z in range(sh.shape[2]):
        sl = np.asarray(sh[:, :, z, :], dtype=np.float32) @ bmat.T
        if keep is not None:
            sl[~keep[:, :, z]] = 0
        odfmax[:, :, z] = np.clip(sl.max(axis=-1), 0, None)
        if odf is not None:
            odf[:, :, z, :] = sl
    if mode == "sf":
        ncoef_k = 0
    else:
        odf = np.ascontiguousarray(sh, dtype=np.float32)
        if keep is not None:
            odf = odf * keep[..., None]
        ncoef_k = ncoef
    if params.stop_method == "threshold":
        if stop_map is None:
            raise ValueError("threshold stopping needs stop_map")
        stop = np.asarray(stop_map, dtype=np.float32)[..., None]
    else:
        if include_map is None or exclude_map is None:
            raise ValueError("ACT/CMC stopping needs include_map and exclude_map")
        stop = np.stack([include_map, exclude_map], axis=-1).astype(np.float32)
    if stop.shape[:3] != sh.shape[:3]:
        raise ValueError(f"stopping map shape {stop.shape[:3]} != ODF shape {sh.shape[:3]}")
    stop = np.concatenate([stop, odfmax[..., None]], axis=-1)
    table = neighbour_and_cone_table(sphere, params.max_angle)
    vs = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    fp, ip = pack_params(params, vs, len(verts), ncoef_k, nbrs.shape[1], mode)
    ip[13] = ncoef
    ip[15] = stop.shape[3] - 1
    extra = {}
    if params.algorithm == "boot":
        if dwi is None or gtab is None or odf_model is None:
            raise ValueError("the bootstrap needs dwi, gtab and odf_model")
        bdata, bootm, nd = bootstrap_arrays(dwi, gtab.bvals, gtab.bvecs, order, odf_model, keep)
        ip[11] = nd
        ip[14] = 0 if odf_model == "csa" else 1
        extra = dict(bdata=bdata, bootm=bootm)
    return TrackingData(odf=np.ascontiguousarray(odf), odf_mode=mode,
                        bmat=np.ascontiguousarray(bmat), verts=verts, nbrs=table,
                        stop=np.ascontiguousarray(stop), affine=affine, fp=fp, ip=ip,
                        params=params, **extra)


# ----------------------------------------------------------------------------- seeding
class MaskSeeder:
    """Seeds in a mask: ``n_seeds`` in random voxels, or ``per_voxel`` seeds in every voxel."""

    def __init__(self, mask: np.ndarray, *, n_seeds: int | None = None,
                 per_voxel: int | None = None, rng_seed: int = 0):
        if (n_seeds is None) == (per_voxel is None):
            raise ValueError("give exactly one of n_seeds and per_voxel")
        self.vox = np.ascontiguousarray(np.argwhere(np.asarray(mask, dtype=bool)), dtype=np.int64)
        if len(self.vox) == 0:
            raise ValueError("the seed mask is empty")
        self.per_voxel = int(per_voxel or 0)
        self.total = int(n_seeds) if n_seeds is not None else len(self.vox) * self.per_voxel
        self.rng_seed = int(rng_seed)

    def chunk(self, first: int, count: int) -> np.ndarray:
        from .cpu_tracker import place_seeds
        out = np.empty((count, 3), dtype=np.float64)
        place_seeds(np.int64(first), np.int64(count), self.vox, np.int64(self.per_voxel),
                    np.int64(self.rng_seed), out)
        return out


class PointSeeder:
    """Explicit seed points, given in voxel indices (or world mm with ``affine``)."""

    def __init__(self, points: np.ndarray, affine: np.ndarray | None = None):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if affine is not None:
            inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
            pts = pts @ inv[:3, :3].T + inv[:3, 3]
        self.points = np.ascontiguousarray(pts)
        self.total = len(pts)

    def chunk(self, first: int, count: int) -> np.ndarray:
        return self.points[first:first + count].copy()


# ----------------------------------------------------------------------------- running
@dataclass
class Chunk:
    positions: np.ndarray     # (M, 3) float32 world mm
    lengths: np.ndarray       # (k,) int64 points per streamline
    seed_index: np.ndarray    # (k,) int64 global seed number
    seed_points: np.ndarray   # (k, 3) float32 world mm
    n_seeds: int              # seeds processed in this chunk


class Tracker:
    """Runs chunks of seeds through the CPU or CUDA kernel."""

    def __init__(self, data: TrackingData, device: str = "cpu"):
        self.data = data
        self.device = device
        if device == "cuda":
            from . import cuda_tracker
            cuda_tracker.check_limits(int(data.ip[5]), int(data.ip[13]), int(data.ip[4]),
                                      int(data.ip[11]))
            self._cuda = cuda_tracker
            self._dev_arrays = cuda_tracker.upload(data)
        elif device != "cpu":
            raise ValueError(f"unknown device {device!r}")

    def auto_chunk_size(self) -> int:
        per = self.data.bytes_per_seed
        if self.device == "cuda":
            free = self._cuda.free_memory()
            return int(np.clip(free * 0.4 // per, 1024, 4_000_000))
        return int(np.clip(min(available_memory() // 4, 2 << 30) // per, 256, 200_000))

    def run(self, seeds_vox: np.ndarray, first_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Track one chunk: returns (positions, lengths, slots) of the kept streamlines."""
        d = self.data
        seeds_vox = np.ascontiguousarray(seeds_vox, dtype=np.float64)
        n_slots = len(seeds_vox) * d.params.max_cross
        min_pts = d.params.min_points
        if self.device == "cuda":
            return self._cuda.run_chunk(self._dev_arrays, seeds_vox, first_index, n_slots,
                                        int(d.ip[3]), min_pts)
        from . import cpu_tracker as cpu
        out = np.empty((n_slots, int(d.ip[3]), 3), dtype=np.float32)
        out_n = np.empty(n_slots, dtype=np.int32)
        import numba
        # small prange chunks balance threads: neighbouring seeds have similar, correlated costs
        with numba.parallel_chunksize(32):
            cpu.track_chunk(seeds_vox, np.int64(first_index), d.odf, d.bmat, d.verts, d.nbrs,
                            d.stop, d.affine, d.fp, d.ip, d.bdata, d.bootm, out, out_n)
        return pack(out, out_n, min_pts)


def pack(out: np.ndarray, out_n: np.ndarray, min_pts: int):
    """Keep slots with at least ``min_pts`` points and pack their points contiguously."""
    from . import cpu_tracker as cpu
    slots = np.flatnonzero(out_n >= min_pts).astype(np.int64)
    lengths = out_n[slots].astype(np.int64)
    offsets = np.zeros(len(slots), dtype=np.int64)
    if len(slots) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    positions = np.empty((int(lengths.sum()), 3), dtype=np.float32)
    if len(slots):
        cpu.gather_points(out, slots, offsets, lengths, positions)
    return positions, lengths, slots


def iter_chunks(tracker: Tracker, seeder, chunk_size: int | None = None, progress: bool = False):
    """Track every seed of ``seeder`` chunk by chunk; yields :class:`Chunk`."""
    from tqdm import tqdm

    total = seeder.total
    if chunk_size is None or chunk_size <= 0:
        chunk_size = tracker.auto_chunk_size()
    chunk_size = int(max(1, min(chunk_size, max(total, 1))))
    aff = tracker.data.affine
    mc = tracker.data.params.max_cross
    starts = range(0, total, chunk_size)
    bar = tqdm(starts, total=len(starts), unit="chunk", disable=None if progress else True,
               desc=f"tracking ({tracker.device})")
    for first in bar:
        count = min(chunk_size, total - first)
        seeds = seeder.chunk(first, count)
        positions, lengths, slots = tracker.run(seeds, first)
        local = slots // mc
        seed_pts = (seeds[local] @ aff[:3, :3].T + aff[:3, 3]).astype(np.float32)
        yield Chunk(positions=positions, lengths=lengths, seed_index=first + local,
                    seed_points=seed_pts, n_seeds=count)


def track_all(tracker: Tracker, seeder, chunk_size: int | None = None):
    """All streamlines in memory (tests, small runs): (list of (n,3) arrays, seed_index array)."""
    streamlines, seed_index = [], []
    for ch in iter_chunks(tracker, seeder, chunk_size):
        offs = np.concatenate([[0], np.cumsum(ch.lengths)])
        streamlines.extend(ch.positions[offs[i]:offs[i + 1]] for i in range(len(ch.lengths)))
        seed_index.append(ch.seed_index)
    idx = np.concatenate(seed_index) if seed_index else np.zeros(0, dtype=np.int64)
    return streamlines, idx

