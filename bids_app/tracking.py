"""Participant-level tractography: options, seeding/stopping maps, streaming to TRX + sidecar.

The kernels live in :mod:`kernels` (one algorithm compiled for CPU and CUDA); this module turns
command-line options and the maps of one DWI run into a tractogram file written atomically.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .derivatives import TRACTOGRAM_FORMATS as FORMATS
from .derivatives import sidecar_path, write_json
from .errors import InputDataError, UsageError

log = logging.getLogger(__name__)

METHODS = ("prob", "det", "ptt", "boot", "none")
STOP_METHODS = ("fa", "gfa", "mask", "act", "cmc")
SEEDINGS = ("wm", "interface", "brain")
ALGORITHM_NAMES = {"prob": "probabilistic", "det": "deterministic (closest peak)",
                   "ptt": "parallel transport tractography", "boot": "residual bootstrap"}
WM_FA_THRESHOLD = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The "tractography" option group (``--device`` comes from the main CLI)."""
    g = parser.add_argument_group("tractography")
    g.add_argument("--tracking", choices=METHODS, default="prob",
                   help="tracking algorithm, or none to skip tractography (default: prob)")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--n-seeds", type=int, default=None, metavar="N",
                   help="N seeds placed at random in the seed mask")
    n.add_argument("--seeds-per-voxel", type=int, default=None, metavar="K",
                   help="K random seeds in every seed-mask voxel (default: 1)")
    g.add_argument("--seed-mask", type=Path, default=None, metavar="NIFTI",
                   help="seed mask on the DWI grid (default: see --seeding)")
    g.add_argument("--seeding", choices=SEEDINGS, default="wm",
                   help="seed region when no --seed-mask: wm (FA > 0.25 in the brain mask), "
                        "interface (WM voxels touching GM), brain (whole mask) (default: wm)")
    g.add_argument("--step-size", type=float, default=None, metavar="MM",
                   help="step size in mm (default: half the smallest voxel size)")
    g.add_argument("--max-angle", type=float, default=30.0, metavar="DEG",
                   help="maximum angle between steps in degrees (default: 30)")
    g.add_argument("--min-length", type=float, default=10.0, metavar="MM",
                   help="discard streamlines shorter than this (mm, default: 10)")
    g.add_argument("--max-length", type=float, default=250.0, metavar="MM",
                   help="maximum streamline length (mm, default: 250)")
    g.add_argument("--stop-method", choices=STOP_METHODS, default="fa",
                   help="stopping criterion: FA or GFA threshold, brain mask, or anatomical "
                        "(ACT / CMC from WM/GM/CSF maps) (default: fa)")
    g.add_argument("--stop-threshold", type=float, default=0.1, metavar="T",
                   help="threshold for --stop-method fa/gfa (default: 0.1)")
    g.add_argument("--pmf-threshold", type=float, default=0.1, metavar="F",
                   help="ODF values below F x the maximum are ignored (default: 0.1)")
    g.add_argument("--max-cross", type=int, default=1, metavar="K",
                   help="streamlines per seed: one per ODF peak, up to K (default: 1)")
    g.add_argument("--rng-seed", type=int, default=0, metavar="S",
                   help="random seed; the same seed gives the same tractogram on any device (default: 0)")
    g.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="seeds per chunk (default: from free memory)")
    g.add_argument("--tractogram-format", choices=FORMATS, default="trx",
                   help="tractogram file format (default: trx)")
    g.add_argument("--float16", action="store_true",
                   help="store TRX positions as float16 (half the size)")


@dataclass
class TrackingOptions:
    method: str = "prob"
    n_seeds: int | None = None
    seeds_per_voxel: int | None = None
    seed_mask: Path | None = None
    seeding: str = "wm"
    step_size: float | None = None
    max_angle: float = 30.0
    min_length: float = 10.0
    max_length: float = 250.0
    stop_method: str = "fa"
    stop_threshold: float = 0.1
    pmf_threshold: float = 0.1
    max_cross: int = 1
    rng_seed: int = 0
    chunk_size: int | None = None
    tractogram_format: str = "trx"
    float16: bool = False
    odf_mode: str = "auto"
    sphere: str = "repulsion724"
    nthreads: int | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args) -> "TrackingOptions":
        """Options from parsed arguments; bad values raise :class:`UsageError`."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        seed_mask = get("seed_mask")
        opts = cls(
            method=get("tracking", "prob") or "none",
            n_seeds=get("n_seeds"), seeds_per_voxel=get("seeds_per_voxel"),
            seed_mask=Path(seed_mask) if seed_mask is not None else None,
            seeding=get("seeding", "wm"), step_size=get("step_size"),
            max_angle=get("max_angle", 30.0), min_length=get("min_length", 10.0),
            max_length=get("max_length", 250.0), stop_method=get("stop_method", "fa"),
            stop_threshold=get("stop_threshold", 0.1), pmf_threshold=get("pmf_threshold", 0.1),
            max_cross=get("max_cross", 1), rng_seed=get("rng_seed", 0),
            chunk_size=get("chunk_size"), tractogram_format=get("tractogram_format", "trx"),
            float16=bool(get("float16", False)), nthreads=get("nthreads"),
            progress=not get("no_progress", False))
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(msg):
            raise UsageError(msg)
        if self.method not in METHODS:
            bad(f"--tracking must be one of {', '.join(METHODS)}")
        if self.n_seeds is not None and self.seeds_per_voxel is not None:
            bad("give --n-seeds or --seeds-per-voxel, not both")
        if self.n_seeds is not None and self.n_seeds < 1:
            bad(f"--n-seeds must be >= 1 (got {self.n_seeds})")
        if self.seeds_per_voxel is not None and self.seeds_per_voxel < 1:
            bad(f"--seeds-per-voxel must be >= 1 (got {self.seeds_per_voxel})")
        if self.step_size is not None and not (self.step_size > 0 and math.isfinite(self.step_size)):
            bad(f"--step-size must be a positive number of mm (got {self.step_size})")
        if not (0 < self.max_angle <= 90):
            bad(f"--max-angle must be in (0, 90] degrees (got {self.max_angle})")
        if not (self.min_length >= 0 and math.isfinite(self.min_length)):
            bad(f"--min-length must be >= 0 mm (got {self.min_length})")
        if not (self.max_length > 0 and math.isfinite(self.max_length)):
            bad(f"--max-length must be > 0 mm (got {self.max_length})")
        if self.min_length > self.max_length:
            bad(f"--min-length ({self.min_length}) is larger than --max-length ({self.max_length})")
        if self.step_size is not None and self.step_size > self.max_length:
            bad("--step-size is larger than --max-length")
        if self.stop_method not in STOP_METHODS:
            bad(f"--stop-method must be one of {', '.join(STOP_METHODS)}")
        if not (0 <= self.stop_threshold < 1) and self.stop_method in ("fa", "gfa"):
            bad(f"--stop-threshold must be in [0, 1) for {self.stop_method} (got {self.stop_threshold})")
        if not (0 <= self.pmf_threshold < 1):
            bad(f"--pmf-threshold must be in [0, 1) (got {self.pmf_threshold})")
        if not (1 <= self.max_cross <= 8):
            bad(f"--max-cross must be between 1 and 8 (got {self.max_cross})")
        if self.rng_seed < 0:
            bad(f"--rng-seed must be >= 0 (got {self.rng_seed})")
        if self.chunk_size is not None and self.chunk_size < 1:
            bad(f"--chunk-size must be >= 1 (got {self.chunk_size})")
        if self.tractogram_format not in FORMATS:
            bad(f"--tractogram-format must be one of {', '.join(FORMATS)}")
        if self.float16 and self.tractogram_format != "trx":
            bad("--float16 applies only to --tractogram-format trx")
        if self.seeding not in SEEDINGS:
            bad(f"--seeding must be one of {', '.join(SEEDINGS)}")
        if self.seed_mask is not None and self.enabled and not Path(self.seed_mask).is_file():
            bad(f"--seed-mask {self.seed_mask}: no such file")
        if self.nthreads is not None and self.nthreads < 1:
            bad("--nthreads must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def extension(self) -> str:
        return "." + self.tractogram_format

    def parameters(self) -> dict:
        """Settings that change the tractogram (JSON-able; not device, threads or chunk size)."""
        d = asdict(self)
        for k in ("chunk_size", "nthreads", "progress"):
            d.pop(k)
        if d["n_seeds"] is None and d["seeds_per_voxel"] is None:
            d["seeds_per_voxel"] = 1
        d["seed_mask"] = str(self.seed_mask) if self.seed_mask is not None else None
        return d


# ----------------------------------------------------------------------------- maps
def voxel_sizes(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def gfa_from_sh(sh: np.ndarray) -> np.ndarray:
    """GFA of an ODF given in an orthonormal SH basis: sqrt(1 - c00^2 / sum c^2)."""
    sh = np.asarray(sh, dtype=np.float64)
    power = (sh ** 2).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.sqrt(np.clip(1.0 - sh[..., 0] ** 2 / power, 0, 1))
    return np.nan_to_num(g).astype(np.float32)


def _load_mask_on_grid(path: Path, shape, affine) -> np.ndarray:
    import nibabel as nib
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # unreadable file: user data problem
        raise InputDataError(f"cannot read seed mask {path}: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(shape[:3]) or not np.allclose(img.affine, affine, atol=1e-3):
        raise InputDataError(f"seed mask {path} is not on the DWI grid (shape {data.shape}, "
                             f"expected {tuple(shape[:3])} with the DWI affine)")
    return data > 0


def wm_gm_interface(wm: np.ndarray, gm: np.ndarray) -> np.ndarray:
    """WM voxels with a GM voxel among their 6 neighbours."""
    from scipy.ndimage import binary_dilation
    return wm & binary_dilation(gm, structure=np.array(
        [[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
         [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], dtype=bool))


def seed_region(opts: TrackingOptions, *, mask, fa, tissue, affine) -> tuple[np.ndarray, str]:
    """The seed mask and a description of it."""
    if opts.seed_mask is not None:
        seeds = _load_mask_on_grid(opts.seed_mask, mask.shape, affine)
        desc = f"user mask {Path(opts.seed_mask).name}"
    elif opts.seeding == "brain":
        seeds, desc = mask.copy(), "brain mask"
    else:
        if tissue is not None:
            wm = (tissue["WM"] > 0.5) & mask
            gm = (tissue["GM"] > 0.5) & mask
        else:
            wm = (fa > WM_FA_THRESHOLD) & mask
            gm = mask & ~wm
        if opts.seeding == "wm":
            seeds = wm
            desc = "WM (tissue map > 0.5)" if tissue is not None else f"WM (FA > {WM_FA_THRESHOLD})"
        else:
            seeds = wm_gm_interface(wm, gm)
            desc = "WM/GM interface"
    if not seeds.any():
        raise InputDataError(f"the seed region ({desc}) is empty for this subject")
    return seeds, desc


def stopping_maps(opts: TrackingOptions, *, mask, fa, gfa, sh, tissue) -> dict:
    """Keyword arguments for :func:`kernels.engine.prepare` and a sidecar description."""
    m = opts.stop_method
    if m in ("fa", "gfa"):
        if m == "gfa" and gfa is None:
            gfa = gfa_from_sh(sh)
        scalar = (fa if m == "fa" else gfa).astype(np.float32) * mask
        return dict(kw=dict(stop_map=scalar), method="threshold", threshold=opts.stop_threshold,
                    desc={"Method": f"{m.upper()} threshold", "Threshold": opts.stop_threshold,
                          "Interpolation": "trilinear", "Mask": "brain mask"})
    if m == "mask":
        return dict(kw=dict(stop_map=mask.astype(np.float32)), method="threshold", threshold=0.5,
                    desc={"Method": "brain mask", "Threshold": 0.5, "Interpolation": "trilinear"})
    if tissue is None or not all(k in tissue for k in ("WM", "GM", "CSF")):
        raise InputDataError(f"--stop-method {m} needs WM/GM/CSF probability maps")
    wm, gm, csf = (np.asarray(tissue[k], dtype=np.float32) for k in ("WM", "GM", "CSF"))
    background = np.clip(1.0 - wm - gm - csf, 0.0, 1.0)
    background[~mask] = 1.0
    include = np.clip(gm + background, 0.0, 1.0)
    exclude = np.where(mask, csf, 0.0).astype(np.float32)
    desc = {"Method": "ACT" if m == "act" else "CMC",
            "IncludeMap": "GM + background (1 - WM - GM - CSF, and outside the brain mask)",
            "ExcludeMap": "CSF",
            "Rule": ("stop in include > 0.5 (valid), reject in exclude > 0.5" if m == "act" else
                     "continuous map criterion: stop or reject with probability "
                     "include/exclude x step / mean voxel size"),
            "Interpolation": "trilinear"}
    return dict(kw=dict(include_map=include, exclude_map=exclude), method=m, threshold=0.0,
                desc=desc)


# ----------------------------------------------------------------------------- running
def build_params(opts: TrackingOptions, affine):
    from kernels.engine import TrackParams
    step = opts.step_size if opts.step_size is not None else 0.5 * float(voxel_sizes(affine).min())
    return TrackParams(algorithm=opts.method, step_size=step, max_angle=opts.max_angle,
                       pmf_threshold=opts.pmf_threshold, stop_threshold=opts.stop_threshold,
                       min_length=opts.min_length, max_length=opts.max_length,
                       max_cross=opts.max_cross, rng_seed=opts.rng_seed)


def _set_threads(n: int | None) -> None:
    if n:
        import numba
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def track_subject(opts: TrackingOptions, *, dwi, gtab, affine, mask, fa, sh, sh_order, odf_model,
                  gfa=None, tissue=None, out_path, sidecar_extra=None, device="auto") -> dict:
    """Track one DWI run and write ``out_path`` (+ JSON sidecar); return run statistics."""
    from kernels import engine
    from kernels.device import select_device

    from .trx_writer import TrxStreamWriter

    if not opts.enabled:
        raise UsageError("tracking is disabled (--tracking none)")
    if opts.method == "boot" and odf_model not in ("csa", "opdt"):
        raise UsageError("--tracking boot refits CSA or OPDT ODFs: use --odf-model csa or opdt")
    dev = select_device(device)
    affine = np.asarray(affine, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    fa = np.nan_to_num(np.asarray(fa, dtype=np.float32))
    sh = np.asarray(sh)
    if sh.shape[:3] != mask.shape or fa.shape != mask.shape:
        raise InputDataError(f"map shapes differ: sh {sh.shape[:3]}, fa {fa.shape}, mask {mask.shape}")
    _set_threads(opts.nthreads)
    t0 = time.perf_counter()

    params = build_params(opts, affine)
    stopping = stopping_maps(opts, mask=mask, fa=fa, gfa=gfa, sh=sh, tissue=tissue)
    params.stop_method = stopping["method"]
    params.stop_threshold = stopping["threshold"]
    seeds_mask, seed_desc = seed_region(opts, mask=mask, fa=fa, tissue=tissue, affine=affine)
    extra = {}
    if opts.method == "boot":
        extra = dict(dwi=dwi, gtab=gtab, odf_model=odf_model)
    data = engine.prepare(sh=sh, affine=affine, params=params, mask=mask, odf_mode=opts.odf_mode,
                          sphere=opts.sphere, **stopping["kw"], **extra)
    per_voxel = opts.seeds_per_voxel if opts.n_seeds is None else None
    if opts.n_seeds is None and per_voxel is None:
        per_voxel = 1
    seeder = engine.MaskSeeder(seeds_mask, n_seeds=opts.n_seeds, per_voxel=per_voxel,
                               rng_seed=opts.rng_seed)
    tracker = engine.Tracker(data, dev)
    chunk = opts.chunk_size or tracker.auto_chunk_size()
    log.info("tracking %s on %s: %d seeds in %s, step %.3g mm, chunks of %d, ODF as %s",
             opts.method, dev, seeder.total, seed_desc, params.step_size, chunk, data.odf_mode)

    dps = {"seed_index": ("int64", 1), "length": ("float32", 1), "seed": ("float32", 3)}
    n_streamlines = 0
    n_points = 0
    t_track = time.perf_counter()
    with TrxStreamWriter(out_path, affine, mask.shape, dps=dps, float16=opts.float16,
                         fmt=opts.tractogram_format) as writer:
        for ch in engine.iter_chunks(tracker, seeder, chunk, progress=opts.progress):
            lengths_mm = ((ch.lengths - 1) * params.step_size).astype(np.float32)
            writer.append(ch.positions, ch.lengths, dps={"seed_index": ch.seed_index,
                                                         "length": lengths_mm,
                                                         "seed": ch.seed_points})
            n_streamlines += len(ch.lengths)
            n_points += len(ch.positions)
        track_seconds = time.perf_counter() - t_track
    seconds = time.perf_counter() - t0

    stats = {"n_seeds": seeder.total, "n_streamlines": n_streamlines, "n_points": n_points,
             "seconds": round(seconds, 3), "tracking_seconds": round(track_seconds, 3),
             "device": dev, "odf_mode": data.odf_mode, "step_size": params.step_size}
    sidecar = dict(sidecar_extra or {})
    sidecar.update(_bep046_sidecar(opts, params, stopping, seed_desc, seeder, stats, odf_model,
                                   sh_order, data, dps))
    write_json(sidecar_path(out_path), sidecar)
    log.info("%d streamlines (%d points) from %d seeds in %.1f s (%.0f seeds/s)", n_streamlines,
             n_points, seeder.total, track_seconds, seeder.total / max(track_seconds, 1e-9))
    return stats


def _bep046_sidecar(opts, params, stopping, seed_desc, seeder, stats, odf_model, sh_order, data,
                    dps) -> dict:
    seeding = {"Region": seed_desc, "NumberOfSeeds": stats["n_seeds"],
               "Placement": ("uniform random within each voxel, "
                             + (f"{seeder.per_voxel} per voxel" if seeder.per_voxel
                                else "voxels drawn at random")),
               "InitialDirections": ("ODF peaks at the seed (relative threshold "
                                     f"{params.rel_peak_threshold}, min separation "
                                     f"{params.min_separation_angle} deg), up to {opts.max_cross}"),
               "Bidirectional": True}
    if seeder.per_voxel:
        seeding["SeedsPerVoxel"] = seeder.per_voxel
    propagation = {"Algorithm": ALGORITHM_NAMES[opts.method], "Model": odf_model.upper(),
                   "SphericalHarmonicOrder": int(sh_order), "StepSize": params.step_size,
                   "StepSizeUnit": "mm", "MaxAngle": opts.max_angle,
                   "PMFThreshold": opts.pmf_threshold, "Interpolation": "trilinear",
                   "Sphere": f"{opts.sphere} (hemisphere, {int(data.ip[5])} directions)",
                   "ODFEvaluation": ("pre-sampled on the sphere" if data.odf_mode == "sf"
                                     else "SH evaluated on the fly"),
                   "RandomNumberGenerator": "counter-based SplitMix64 keyed on (rng seed, seed index)",
                   "RandomSeed": opts.rng_seed}
    if opts.method == "ptt":
        propagation.update({"ProbeLength": float(data.fp[10]), "ProbePoints": int(data.ip[9]),
                            "MaxCurvature": float(data.fp[11]), "MaxTries": int(data.ip[10])})
    elif opts.method == "boot":
        propagation.update({"BootstrapModel": odf_model.upper(), "BootstrapVolumes": int(data.ip[11]),
                            "MaxTries": int(data.ip[12]),
                            "Residuals": "leverage-corrected, resampled with replacement"})
    elif opts.method == "prob":
        propagation["Cone"] = "only directions within MaxAngle of the previous step"
    acceptance = {"MinimumLength": opts.min_length, "MaximumLength": opts.max_length,
                  "LengthUnit": "mm",
                  "MaximumLengthRule": "tracking stops when the joined streamline reaches it"}
    if stopping["method"] in ("act", "cmc"):
        acceptance["AnatomicalConstraint"] = "both ends must stop in the include map (or leave the image)"
    return {
        "Description": f"Whole-brain tractography ({ALGORITHM_NAMES[opts.method]})",
        "StreamlineSeeding": seeding,
        "StreamlinePropagation": propagation,
        "StreamlineTermination": stopping["desc"],
        "StreamlineAcceptanceCriteria": acceptance,
        "StepSize": params.step_size,
        "NumberOfSeeds": stats["n_seeds"],
        "NumberOfStreamlines": stats["n_streamlines"],
        "RandomSeed": opts.rng_seed,
        "Device": stats["device"],
        "TrackingTime": stats["tracking_seconds"],
        "TotalTime": stats["seconds"],
        "TimeUnit": "s",
        "SeedsPerSecond": round(stats["n_seeds"] / max(stats["tracking_seconds"], 1e-9), 1),
        "CoordinateSystem": "RAS+ world mm of the subject's native space",
        "PositionsDataType": "float16" if opts.float16 else "float32",
        "DataPerStreamline": {"seed_index": "global seed number", "length": "length along the path in mm",
                              "seed": "seed point (RAS+ mm)"} if opts.tractogram_format == "trx" else {},
    }
