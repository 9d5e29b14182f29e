"""Python tracking API, in the spirit of DIPY's ``probabilistic_tracking``.

::

    from kernels import track
    sft = track(sh, affine, basis="descoteaux07", frame="fsl",      # a DIPY fit on BIDS b-vectors
                seeds=wm_mask, stopping=fa, stop_threshold=0.1,
                algorithm="prob", step_size=0.5, max_angle=30, device="auto")
    # sft: dipy StatefulTractogram, streamlines in world (RAS+) mm

The SH coefficients' basis and frame are required arguments: the same numbers mean different
ODFs in DIPY's ``descoteaux07`` and MRtrix3's ``tournier07``, and on any image whose affine is not
the identity, in the voxel and the world frame (see :mod:`kernels.frames`).  Tracking parameters
are the fields of :class:`~kernels.engine.TrackParams` (``step_size`` in mm, ``max_angle`` in
degrees, ...), given as keywords or as ``params``.  Seeds are world points (N, 3) or a boolean
mask on the image grid.  Results do not depend on the device, the chunk size or the thread count.

For large runs, :class:`TrackingRun` streams chunks instead of holding every streamline.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from . import engine
from .device import check_gpus, select_device
from .errors import ParameterError
from .frames import USUAL_LEGACY, convert_sh

__all__ = ["track", "TrackingRun", "make_seeder", "threshold_map", "to_tractogram"]


class TrackingRun:
    """One tracking job: converted ODF, stopping maps, seeds, device; yields chunks of streamlines.

    ``stopping``: a boolean mask (track while inside) or a scalar map (track while above
    ``stop_threshold``); for anatomical stopping give ``include_map`` and ``exclude_map`` with
    ``stop_method="act"`` or ``"cmc"`` instead.  ``mask``: ODF values outside it are zeroed
    (default: none).  ``memory_budget`` (bytes) bounds the pre-sampled ODF and the CPU chunk size.
    ``bootstrap``: :func:`kernels.engine.bootstrap_arrays` output, for ``algorithm="boot"``.
    ``gpus``: GPU numbers to spread chunks over (default: every visible one); ``precision``: the
    tracking arithmetic, ``"float32"`` (the GPU's default) or ``"float64"`` (the CPU's).
    """

    def __init__(self, sh, affine, *, basis: str, frame: str, seeds, legacy: bool | None = None,
                 stopping=None, stop_threshold: float | None = None, include_map=None, exclude_map=None,
                 mask=None, params: engine.TrackParams | None = None, n_seeds: int | None = None,
                 seeds_per_voxel: int | None = None, device: str = "auto", sphere: str = "repulsion724",
                 odf_mode: str = "auto", memory_budget: int | None = None,
                 bootstrap: engine.BootstrapData | None = None, gpus=None, precision: str | None = None,
                 **param_overrides):
        self.affine = np.asarray(affine, dtype=np.float64)
        sh = np.asarray(sh)
        if sh.ndim != 4:
            raise ParameterError("sh", f"must be 4D (X, Y, Z, coefficients), got shape {sh.shape}")
        self.shape = sh.shape[:3]
        params = dataclasses.replace(params or engine.TrackParams(), **param_overrides)
        stop_kw, params = self._stopping(params, stopping, stop_threshold, include_map, exclude_map)
        self.device = select_device(device)
        self.gpus = check_gpus(gpus) if self.device == "cuda" else None
        if precision not in (None, "float32", "float64"):
            raise ParameterError("precision", f"must be float32 or float64, not {precision!r}")
        self.precision = precision
        legacy = USUAL_LEGACY.get(basis, False) if legacy is None else bool(legacy)
        # only the mask's voxels: prepare() keeps the ODF of those alone
        internal = convert_sh(sh, basis=basis, legacy=legacy, frame=frame, affine=self.affine, mask=mask)
        self.data = engine.prepare(sh=internal, affine=self.affine, params=params, mask=mask,
                                   odf_mode=odf_mode, sphere=sphere, memory_budget=memory_budget,
                                   bootstrap=bootstrap, **stop_kw)
        self.seeder = make_seeder(seeds, self.shape, self.affine, n_seeds, seeds_per_voxel, params.rng_seed)
        self.memory_budget = memory_budget
        self._tracker = None

    # ------------------------------------------------------------------ setup
    def _stopping(self, params, stopping, stop_threshold, include_map, exclude_map):
        if include_map is not None or exclude_map is not None:
            if include_map is None or exclude_map is None:
                raise ParameterError("include_map", "and exclude_map go together")
            if params.stop_method not in ("act", "cmc"):
                params = dataclasses.replace(params, stop_method="act")
            return {"include_map": include_map, "exclude_map": exclude_map}, params
        if stopping is None:
            raise ParameterError("stopping", "is required: a mask, a scalar map, or include/exclude maps")
        stop_map, threshold = threshold_map(stopping, stop_threshold, self.shape)
        params = dataclasses.replace(params, stop_method="threshold", stop_threshold=threshold)
        return {"stop_map": stop_map}, params

    # ------------------------------------------------------------------ running
    @property
    def n_seeds(self) -> int:
        return self.seeder.total

    @property
    def tracker(self) -> engine.Tracker:
        if self._tracker is None:
            self._tracker = engine.Tracker(self.data, self.device, precision=self.precision,
                                           gpus=self.gpus)
        return self._tracker

    def chunk_size(self, requested: int | None = None) -> int:
        return int(requested) if requested else self.tracker.auto_chunk_size(self.memory_budget)

    def chunks(self, chunk_size: int | None = None, progress: bool = False) -> Iterator[engine.Chunk]:
        """Streamlines chunk by chunk (:class:`kernels.engine.Chunk`, world mm)."""
        yield from engine.iter_chunks(self.tracker, self.seeder, self.chunk_size(chunk_size), progress=progress)

    def tractogram(self, chunk_size: int | None = None, progress: bool = False):
        """Every streamline in memory, as a dipy ``StatefulTractogram`` in RAS+ mm, with the seed
        index and seed point of each streamline as data per streamline."""
        return to_tractogram(self.chunks(chunk_size, progress), self.affine, self.shape)


def make_seeder(seeds, shape, affine, n_seeds=None, per_voxel=None, rng_seed=0):
    """A seeder from a boolean mask on the grid (``n_seeds`` at random or ``per_voxel`` in every
    voxel, 1 per voxel by default) or from world points (N, 3) in mm."""
    seeds = np.asarray(seeds)
    if seeds.dtype == bool:
        if seeds.shape != tuple(shape):
            raise ParameterError("seeds", f"mask has shape {seeds.shape}, the image {tuple(shape)}")
        if not seeds.any():
            raise ParameterError("seeds", "mask is empty")
        if n_seeds is None and per_voxel is None:
            per_voxel = 1
        if n_seeds is not None and per_voxel is not None:
            raise ParameterError("n_seeds", "and seeds_per_voxel exclude each other")
        for name, v in (("n_seeds", n_seeds), ("seeds_per_voxel", per_voxel)):
            if v is not None and v < 1:
                raise ParameterError(name, f"must be >= 1 (got {v})")
        return engine.MaskSeeder(seeds, n_seeds=n_seeds, per_voxel=per_voxel, rng_seed=rng_seed)
    if seeds.ndim != 2 or seeds.shape[1] != 3:
        raise ParameterError("seeds", "must be world points (N, 3) in mm or a boolean mask")
    return engine.PointSeeder(seeds, affine=affine)


def threshold_map(stopping, stop_threshold, shape):
    """(float32 map, threshold): a boolean mask (track while inside: threshold 0.5) or a scalar
    map with ``stop_threshold`` (track while above it)."""
    stopping = np.asarray(stopping)
    if stopping.shape != tuple(shape):
        raise ParameterError("stopping", f"has shape {stopping.shape}, the image {tuple(shape)}")
    if stopping.dtype == bool:
        return stopping.astype(np.float32), 0.5
    if stop_threshold is None:
        raise ParameterError("stop_threshold", "is required with a scalar stopping map")
    return np.nan_to_num(stopping.astype(np.float32)), float(stop_threshold)


def to_tractogram(chunks, affine, shape):
    """Chunks (:class:`kernels.engine.Chunk`) gathered into a dipy ``StatefulTractogram`` (RAS+ mm)
    with ``seed_index`` and ``seed`` as data per streamline."""
    import nibabel as nib
    from dipy.io.stateful_tractogram import Space, StatefulTractogram
    from nibabel.streamlines import ArraySequence

    pos, lengths, index, seed_pts = [], [], [], []
    for ch in chunks:
        pos.append(ch.positions)
        lengths.append(ch.lengths)
        index.append(ch.seed_index)
        seed_pts.append(ch.seed_points)
    seq = ArraySequence()
    if pos:
        seq._data = np.concatenate(pos).astype(np.float32)
        seq._lengths = np.concatenate(lengths).astype(np.int64)
        seq._offsets = np.concatenate([[0], np.cumsum(seq._lengths)[:-1]]).astype(np.int64)
    affine = np.asarray(affine, dtype=np.float64)
    vs = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    reference = (affine, np.array(shape), vs, "".join(nib.aff2axcodes(affine)))
    dps = {"seed_index": np.concatenate(index) if index else np.zeros(0, np.int64),
           "seed": np.concatenate(seed_pts) if seed_pts else np.zeros((0, 3), np.float32)}
    return StatefulTractogram(seq, reference, Space.RASMM, data_per_streamline=dps)


def track(sh, affine, *, basis: str, frame: str, seeds, **kwargs):
    """Track from SH coefficients; returns a dipy ``StatefulTractogram`` (RAS+ mm).

    ``basis``: ``"descoteaux07"`` (DIPY) or ``"tournier07"`` (MRtrix3), with ``legacy`` (default:
    True for descoteaux07 as in DIPY, False for tournier07 as in MRtrix3).  ``frame``: the axes the
    coefficients refer to, ``"world"`` (MRtrix3, BEP016 xyz), ``"voxel"`` (BEP016 ijk) or
    ``"fsl"`` (DIPY fitted with BIDS/FSL b-vectors as they are).  Other keywords: see
    :class:`TrackingRun` and the fields of :class:`kernels.engine.TrackParams`;
    ``chunk_size``/``progress`` go to the run.
    """
    chunk_size = kwargs.pop("chunk_size", None)
    progress = kwargs.pop("progress", False)
    return TrackingRun(sh, affine, basis=basis, frame=frame, seeds=seeds, **kwargs).tractogram(
        chunk_size=chunk_size, progress=progress)
