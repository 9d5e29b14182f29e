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
from dataclasses import dataclass, field, replace

import numpy as np

from . import tracking_core as core
from .errors import ParameterError
from .params import TrackParams
from .sphere import hemisphere, neighbour_and_cone_table, sh_order_from_ncoef, sh_to_sf_matrix

log = logging.getLogger(__name__)

__all__ = ["TrackParams", "TrackingData", "BootstrapData", "prepare", "bootstrap_arrays", "MaskSeeder",
           "PointSeeder", "Tracker", "Chunk", "iter_chunks", "track_all", "choose_odf_mode",
           "available_memory"]

# parameter names -> the kernels' codes
ALGORITHM_CODES = {"prob": core.ALGO_PROB, "det": core.ALGO_DET, "ptt": core.ALGO_PTT,
                   "boot": core.ALGO_BOOT}
STOP_CODES = {"threshold": core.STOP_THRESHOLD, "act": core.STOP_ACT, "cmc": core.STOP_CMC}


@dataclass(frozen=True)
class BootstrapData:
    """Inputs of the residual bootstrap: one shell's signal, its b=0 and its matrices."""

    bdata: np.ndarray        # (X, Y, Z, nd + 1) float32: the nd volumes of the shell, then the mean b=0
    bootm: np.ndarray        # (2 nd + 2 K, nd) float64, see kernels.tracking_core
    n_volumes: int
    model: str               # "csa" or "opdt"


@dataclass
class TrackingData:
    """Everything a kernel reads, as contiguous arrays, and the settings they were made with."""

    odf_index: np.ndarray    # (X, Y, Z) int32: each voxel's row in the ODF table, 0 = no ODF
    odf_sf: np.ndarray       # (R, Vp) int16 ODF sampled on the sphere, one row per voxel (sf mode)
    odf_sh: np.ndarray       # (R, K) float32 SH coefficients, one row per voxel (sh mode)
    odf_scale: np.ndarray    # (R,) float32 value of one unit of each odf_sf row (1 in sh mode)
    odf_mode: str            # "sf" or "sh"
    bmat: np.ndarray         # (V, K) float32 SH -> sphere matrix
    verts: np.ndarray        # (V, 3) float64 hemisphere, scaled-voxel-axis frame
    nbrs: np.ndarray         # (V, D + C) int32 neighbours then cone candidates
    stop: np.ndarray         # (X, Y, Z, C) float32: threshold map or include/exclude, then ODF max
    affine: np.ndarray       # (4, 4) float64 voxel -> world
    fp: np.ndarray           # float parameters, slots named F_* in kernels.tracking_core
    ip: np.ndarray           # int parameters, slots named I_*
    params: TrackParams = field(repr=False)   # with defaults resolved (e.g. ptt_probe_length)
    sh_order: int = 0
    bootstrap: BootstrapData | None = field(default=None, repr=False)

    @property
    def n_directions(self) -> int:
        return int(self.verts.shape[0])

    @property
    def odf_arrays(self) -> tuple:
        """The ODF table as the kernels take it: (index, sf, sh, scale)."""
        return self.odf_index, self.odf_sf, self.odf_sh, self.odf_scale

    @property
    def odf_nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.odf_arrays))

    @property
    def bdata(self) -> np.ndarray:
        return self.bootstrap.bdata if self.bootstrap else np.zeros((1, 1, 1, 1), np.float32)

    @property
    def bootm(self) -> np.ndarray:
        return self.bootstrap.bootm if self.bootstrap else np.zeros((1, 1), np.float64)

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


def pack_params(p: TrackParams, *, voxel_sizes, n_verts: int, n_odf_coef: int, n_sh_coef: int,
                nbr_degree: int, odf_mode: str, max_channel: int,
                bootstrap: BootstrapData | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' ``fp``/``ip`` vectors, filled slot by named slot."""
    vs = np.asarray(voxel_sizes, dtype=np.float64)
    fp = np.zeros(core.N_FLOAT_PARAMS, dtype=np.float64)
    fp[core.F_STEP_SIZE] = p.step_size
    fp[core.F_COS_MAX_ANGLE] = math.cos(math.radians(p.max_angle))
    fp[core.F_PMF_THRESHOLD] = p.pmf_threshold
    fp[core.F_STOP_THRESHOLD] = p.stop_threshold
    fp[core.F_REL_PEAK_THRESHOLD] = p.rel_peak_threshold
    fp[core.F_COS_MIN_SEPARATION] = math.cos(math.radians(p.min_separation_angle))
    fp[core.F_VOXEL_X], fp[core.F_VOXEL_Y], fp[core.F_VOXEL_Z] = vs
    fp[core.F_CMC_SCALE] = p.step_size / float(vs.mean())
    fp[core.F_PTT_PROBE_LENGTH] = p.ptt_probe_length
    fp[core.F_PTT_MAX_CURVATURE] = math.radians(p.max_angle) / p.step_size
    ip = np.zeros(core.N_INT_PARAMS, dtype=np.int64)
    ip[core.I_ALGORITHM] = ALGORITHM_CODES[p.algorithm]
    ip[core.I_ODF_MODE] = core.ODF_SF if odf_mode == "sf" else core.ODF_SH
    ip[core.I_STOP_METHOD] = STOP_CODES[p.stop_method]
    ip[core.I_MAX_POINTS] = p.max_points
    ip[core.I_MAX_CROSS] = p.max_cross
    ip[core.I_N_VERTS] = n_verts
    ip[core.I_N_ODF_COEF] = n_odf_coef
    ip[core.I_NBR_DEGREE] = nbr_degree
    ip[core.I_RNG_SEED] = int(p.rng_seed)
    ip[core.I_PTT_PROBE_POINTS] = p.ptt_probe_points
    ip[core.I_PTT_MAX_TRIES] = p.ptt_max_tries
    ip[core.I_BOOT_MAX_TRIES] = p.boot_max_tries
    ip[core.I_N_SH_COEF] = n_sh_coef
    ip[core.I_MAX_CHANNEL] = max_channel
    if bootstrap is not None:
        ip[core.I_BOOT_N_DWI] = bootstrap.n_volumes
        ip[core.I_BOOT_MODEL] = core.BOOT_CSA if bootstrap.model == "csa" else core.BOOT_OPDT
    return fp, ip


def bootstrap_arrays(signal: np.ndarray, s0: np.ndarray, bvecs: np.ndarray, sh_order: int, model: str,
                     *, smooth: float, mask: np.ndarray | None = None) -> BootstrapData:
    """Residual-bootstrap inputs for the CSA or OPDT model on one shell.

    ``signal`` (X, Y, Z, nd): the shell's diffusion-weighted volumes; ``s0`` (X, Y, Z): the mean
    b=0; ``bvecs`` (nd, 3) unit vectors in the scaled-voxel-axis frame; ``smooth``: the
    Laplace-Beltrami regularisation of the ODF fit being bootstrapped.
    """
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_tournier, smooth_pinv
    from scipy.special import eval_legendre

    if model not in ("csa", "opdt"):
        raise ParameterError("model", "of the residual bootstrap must be csa or opdt")
    g = np.asarray(bvecs, dtype=np.float64)
    nd = g.shape[0]
    if signal.shape[3] != nd:
        raise ValueError(f"{signal.shape[3]} volumes but {nd} b-vectors")
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    _, theta, phi = cart2sphere(g[:, 0], g[:, 1], g[:, 2])
    bm, _m, lv = real_sh_tournier(sh_order, theta[:, None], phi[:, None], legacy=False)
    lap = -lv * (lv + 1.0)
    inv_b = smooth_pinv(bm, np.sqrt(smooth) * lap)              # (K, nd)
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
    bdata = np.empty(signal.shape[:3] + (nd + 1,), dtype=np.float32)
    bdata[..., :nd] = np.clip(signal, 1e-5, None)
    bdata[..., nd] = np.clip(s0, 0, None)
    if mask is not None:
        bdata[~np.asarray(mask, dtype=bool)] = 0
    return BootstrapData(bdata=bdata, bootm=bootm, n_volumes=nd, model=model)


SF_ROW_ALIGN = 16   # int16 values: rows of the sampled-ODF table start on 32-byte sectors


def sf_row_length(nverts: int) -> int:
    return -(-int(nverts) // SF_ROW_ALIGN) * SF_ROW_ALIGN


def sf_bytes(n_rows: int, nverts: int) -> int:
    """Bytes of the sampled-ODF table for ``n_rows`` voxels (int16 values + a float32 scale)."""
    return int(n_rows + 1) * (sf_row_length(nverts) * 2 + 4)


def choose_odf_mode(requested: str, n_rows: int, nverts: int, budget_bytes: int | None = None) -> str:
    """``sf`` (pre-sampled, fastest) when it fits in the budget, else ``sh`` (on the fly)."""
    if requested in ("sf", "sh"):
        return requested
    if budget_bytes is None:
        budget_bytes = min(available_memory() // 4, 8 << 30)
    return "sf" if sf_bytes(n_rows, nverts) <= budget_bytes else "sh"


def odf_rows(sh: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(X, Y, Z) int32: row 1, 2, ... of the ODF table for each voxel with an ODF (inside the mask
    and with a coefficient != 0), in C order; 0 elsewhere (row 0 of every table is zero)."""
    index = np.zeros(sh.shape[:3], dtype=np.int32)
    n = 0
    for x in range(sh.shape[0]):       # one slab at a time: no full-size temporary
        has = np.any(np.asarray(sh[x]) != 0, axis=-1)
        if mask is not None:
            has &= mask[x]
        k = int(has.sum())
        index[x][has] = np.arange(n + 1, n + k + 1, dtype=np.int32)
        n += k
    return index


def odf_table(sh: np.ndarray, index: np.ndarray, bmat: np.ndarray, mode: str):
    """The ODF table of the voxels listed in ``index`` and each voxel's ODF maximum.

    ``sf``: the ODF sampled on the sphere's vertices, stored as int16 with one float32 scale per
    row (the row's largest magnitude maps to 32767): 2 bytes a value, relative precision 3e-5 of
    the voxel's own maximum.  ``sh``: the float32 coefficients.  Returns (sf, sh, scale, odfmax).
    """
    n = int(index.max(initial=0))
    nverts, ncoef = bmat.shape
    odfmax = np.zeros(index.shape, dtype=np.float32)
    scale = np.ones(n + 1, dtype=np.float32)
    scale[0] = 0.0
    if mode == "sf":
        sf = np.zeros((n + 1, sf_row_length(nverts)), dtype=np.int16)
        shc = np.zeros((1, 1), dtype=np.float32)
    else:
        sf = np.zeros((1, 1), dtype=np.int16)
        shc = np.zeros((n + 1, ncoef), dtype=np.float32)
    for x in range(index.shape[0]):
        has = index[x] > 0
        k = int(has.sum())
        if k == 0:
            continue
        r0 = int(index[x][has].min())          # a slab's rows are consecutive (C order)
        coef = np.asarray(sh[x], dtype=np.float32)[has]
        vals = coef @ bmat.T
        top = vals.max(axis=1)
        odfmax[x][has] = np.maximum(top, 0)
        if mode == "sh":
            shc[r0:r0 + k] = coef
            continue
        s = np.maximum(top, -vals.min(axis=1)) / np.float32(32767.0)
        s[s == 0] = 1.0
        vals *= (np.float32(1.0) / s)[:, None]   # in units of the row's scale, in place (float32):
        np.rint(vals, out=vals)                  # |vals| <= 32767 (1 + 2e-7): no clipping needed
        sf[r0:r0 + k, :nverts] = vals
        scale[r0:r0 + k] = s
    return sf, shc, scale, odfmax


def prepare(*, sh: np.ndarray, affine: np.ndarray, params: TrackParams,
            stop_map: np.ndarray | None = None, include_map: np.ndarray | None = None,
            exclude_map: np.ndarray | None = None, mask: np.ndarray | None = None,
            odf_mode: str = "auto", sphere: str = "repulsion724",
            memory_budget: int | None = None, bootstrap: BootstrapData | None = None) -> TrackingData:
    """Arrays for the kernels from SH coefficients (tournier07, legacy=False, voxel frame).

    Threshold stopping uses ``stop_map`` (> ``params.stop_threshold`` keeps tracking; pass a 0/1
    mask with threshold 0.5 for mask stopping).  ACT/CMC use ``include_map`` / ``exclude_map``.
    The ODF is kept only for voxels inside ``mask`` (default: every voxel with an ODF), in a table
    of one row per voxel; ``memory_budget`` (bytes) decides whether it is pre-sampled on the
    sphere (``odf_mode`` auto).  The residual bootstrap (``params.algorithm == "boot"``) needs
    ``bootstrap``.
    """
    sh = np.asarray(sh)
    if sh.ndim != 4:
        raise ValueError("sh must be 4D (X, Y, Z, K)")
    affine = np.asarray(affine, dtype=np.float64)
    verts, nbrs = hemisphere(sphere)
    ncoef = sh.shape[3]
    order = sh_order_from_ncoef(ncoef)
    bmat = sh_to_sf_matrix(verts, order)
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    index = odf_rows(sh, keep)
    mode = choose_odf_mode(odf_mode, int(index.max(initial=0)), len(verts), memory_budget)
    sf, shc, scale, odfmax = odf_table(sh, index, bmat, mode)
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
    if params.algorithm == "boot" and bootstrap is None:
        raise ValueError("the residual bootstrap needs bootstrap data (see bootstrap_arrays)")
    table = neighbour_and_cone_table(sphere, params.max_angle)
    vs = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if params.ptt_probe_length is None:
        params = replace(params, ptt_probe_length=float(vs.min()))
    fp, ip = pack_params(params, voxel_sizes=vs, n_verts=len(verts), n_odf_coef=ncoef if mode == "sh" else 0,
                         n_sh_coef=ncoef, nbr_degree=nbrs.shape[1], odf_mode=mode,
                         max_channel=stop.shape[3] - 1,
                         bootstrap=bootstrap if params.algorithm == "boot" else None)
    return TrackingData(odf_index=index, odf_sf=sf, odf_sh=shc, odf_scale=scale, odf_mode=mode,
                        bmat=np.ascontiguousarray(bmat), verts=verts, nbrs=table,
                        stop=np.ascontiguousarray(stop), affine=affine, fp=fp, ip=ip,
                        params=params, sh_order=order,
                        bootstrap=bootstrap if params.algorithm == "boot" else None)


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
    """Runs chunks of seeds through the CPU or CUDA kernels.

    ``precision``: the tracking arithmetic, ``float64`` (the CPU's default) or ``float32`` (the
    GPU's default).  ``gpus``: the GPUs to spread chunks over (default: every visible one).
    """

    def __init__(self, data: TrackingData, device: str = "cpu", *, precision: str | None = None,
                 gpus=None):
        self.data = data
        self.device = device
        if device == "cuda":
            from . import cuda_tracker
            self.precision = precision or "float32"
            self._cuda = cuda_tracker.CudaRunner(data, gpus=gpus, precision=self.precision)
        elif device == "cpu":
            from . import cpu_tracker
            self.precision = precision or "float64"
            self._track_chunk = cpu_tracker.track_chunk_for(self.precision)
        else:
            raise ValueError(f"unknown device {device!r}")

    @property
    def bytes_per_seed(self) -> int:
        """Device memory per seed of a chunk: its streamlines' points (both halves on CUDA)."""
        per = self.data.bytes_per_seed
        return 2 * per if self.device == "cuda" else per

    def auto_chunk_size(self, memory_budget: int | None = None) -> int:
        """Seeds per chunk: from the GPU's free memory, or a quarter of ``memory_budget`` (bytes;
        default: the RAM available now) on the CPU."""
        per = self.bytes_per_seed
        if self.device == "cuda":
            free = self._cuda.free_memory()
            return int(np.clip(free * 0.3 // per, 1024, 4_000_000))   # two chunks in flight
        budget = available_memory() if memory_budget is None else int(memory_budget)
        return int(np.clip(min(budget // 4, 2 << 30) // per, 256, 200_000))

    def run(self, seeds_vox: np.ndarray, first_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Track one chunk: returns (positions, lengths, slots) of the kept streamlines."""
        d = self.data
        if self.device == "cuda":
            return self._cuda.run(np.ascontiguousarray(seeds_vox, dtype=np.float64), first_index)
        real = np.float32 if self.precision == "float32" else np.float64
        seeds_vox = np.ascontiguousarray(seeds_vox, dtype=real)
        n_slots = len(seeds_vox) * d.params.max_cross
        out = np.empty((n_slots, d.params.max_points, 3), dtype=np.float32)
        out_n = np.empty(n_slots, dtype=np.int32)
        import numba
        ins = (*d.odf_arrays, d.bmat, d.verts.astype(real), d.nbrs, d.stop, d.affine.astype(real),
               d.fp.astype(real), d.ip, d.bdata, d.bootm.astype(real))
        # small prange chunks balance threads: neighbouring seeds have similar, correlated costs
        with numba.parallel_chunksize(32):
            self._track_chunk(seeds_vox, np.int64(first_index), *ins, out, out_n)
        return pack(out, out_n, d.params.min_points)

    def stream(self, chunks):
        """Track ``(first_index, seeds_vox)`` chunks; yields ``(first_index, seeds_vox, (positions,
        lengths, slots))`` in order (on CUDA, overlapping chunks and spread over the GPUs)."""
        if self.device == "cuda":
            yield from self._cuda.stream(chunks)
            return
        for first, seeds in chunks:
            yield first, seeds, self.run(seeds, first)


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
    bar = tqdm(total=len(starts), unit="chunk", disable=None if progress else True,
               desc=f"tracking ({tracker.device})")
    chunks = ((first, seeder.chunk(first, min(chunk_size, total - first))) for first in starts)
    try:
        for first, seeds, (positions, lengths, slots) in tracker.stream(chunks):
            local = slots // mc
            seed_pts = (seeds[local] @ aff[:3, :3].T + aff[:3, 3]).astype(np.float32)
            bar.update(1)
            yield Chunk(positions=positions, lengths=lengths, seed_index=first + local,
                        seed_points=seed_pts, n_seeds=len(seeds))
    finally:
        bar.close()


def track_all(tracker: Tracker, seeder, chunk_size: int | None = None):
    """All streamlines in memory (tests, small runs): (list of (n,3) arrays, seed_index array)."""
    streamlines, seed_index = [], []
    for ch in iter_chunks(tracker, seeder, chunk_size):
        offs = np.concatenate([[0], np.cumsum(ch.lengths)])
        streamlines.extend(ch.positions[offs[i]:offs[i + 1]] for i in range(len(ch.lengths)))
        seed_index.append(ch.seed_index)
    idx = np.concatenate(seed_index) if seed_index else np.zeros(0, dtype=np.int64)
    return streamlines, idx

