"""Participant-level tractography: seeding and stopping maps of one DWI run, streamed to TRX + sidecar.

The kernels live in :mod:`kernels` (one algorithm compiled for CPU and CUDA, driven through
:class:`kernels.api.TrackingRun`); this module turns the :class:`~bids_app.config.Tracking`
settings and the maps of one DWI run into a tractogram file written atomically.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.params import ALGORITHM_NAMES

from .config import Tracking, check_algorithm_model, flag_errors
from .derivatives import sidecar_path, write_json
from .errors import InputDataError

log = logging.getLogger(__name__)

WM_FA_THRESHOLD = 0.25


@dataclass
class RunMaps:
    """The maps of one DWI run that tracking reads (all on the DWI grid)."""

    affine: np.ndarray
    mask: np.ndarray
    fa: np.ndarray
    sh: np.ndarray                 # tournier07 (legacy=False) coefficients, in the frame sh_frame
    sh_order: int
    odf_model: str
    sh_frame: str = "world"        # "world" (what the ODF stage writes, BEP016 xyz) or "voxel" (ijk)
    gfa: np.ndarray | None = None
    tissue: dict | None = None     # WM/GM/CSF probability maps (ACT, CMC, interface seeding)
    dwi: np.ndarray | None = None  # the signal and its gradient table: the residual bootstrap only
    gtab: object | None = None


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


def seed_region(opts: Tracking, *, mask, fa, tissue, affine) -> tuple[np.ndarray, str]:
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


def peak_amplitude(sh: np.ndarray, mask: np.ndarray, sphere: str = "repulsion724") -> np.ndarray:
    """Largest value of each voxel's ODF (tournier07 SH, any frame) on a sphere, 0 outside ``mask``."""
    from kernels.frames import sh_order_from_ncoef
    from kernels.sphere import hemisphere, sh_to_sf_matrix
    verts, _ = hemisphere(sphere)
    bmat = sh_to_sf_matrix(verts, sh_order_from_ncoef(sh.shape[-1]))
    amp = np.zeros(mask.shape, np.float32)
    for z in range(mask.shape[2]):            # a slab at a time: bounded memory
        m = mask[:, :, z]
        if m.any():
            amp[:, :, z][m] = np.clip((sh[:, :, z][m].astype(np.float32) @ bmat.T).max(axis=1), 0, None)
    return amp


def relative_fod_amplitude(sh, fa, mask) -> tuple[np.ndarray, float, int, float]:
    """Peak fibre-ODF amplitude divided by its median over single-fibre voxels (the FA threshold of
    the CSD response: 0.7, else 0.6 or 0.5): (map, reference, voxels, FA threshold).  A cutoff on
    this ratio means the same on any ODF scale (DIPY's CSD, MSMT-CSD, MRtrix3's)."""
    amp = peak_amplitude(sh, mask)
    for thr in (0.7, 0.6, 0.5):
        ref_vox = mask & (fa > thr) & (amp > 0)
        if ref_vox.sum() >= 50:
            break
    if ref_vox.sum() < 10:
        raise InputDataError("--stop-method fod: too few single-fibre voxels (FA > 0.5) to scale the ODF "
                             "amplitude; use --stop-method fa")
    ref = float(np.median(amp[ref_vox]))
    return amp / ref, ref, int(ref_vox.sum()), thr


def stopping_maps(opts: Tracking, *, mask, fa, gfa, sh, tissue, odf_model: str = "csd") -> dict:
    """Keyword arguments for :class:`kernels.api.TrackingRun` and a sidecar description."""
    m = opts.stop_rule(odf_model)
    if m == "fod":
        rel, ref, n_ref, thr = relative_fod_amplitude(sh, fa, mask)
        t, c = opts.stop_threshold, opts.fod_cutoff
        ratio = rel / c if t <= 0 else np.minimum(fa / t, rel / c)
        scalar = (0.5 * ratio * mask).astype(np.float32)       # >= 0.5 where both criteria hold
        return dict(kw=dict(stopping=scalar, stop_threshold=0.5), method="threshold",
                    desc={"Method": "FA and fibre-ODF peak amplitude", "FAThreshold": t, "FODCutoff": c,
                          "FODReference": {"Description": f"median peak ODF amplitude of the single-fibre voxels "
                                                          f"(FA > {thr})", "Value": round(ref, 6), "Voxels": n_ref},
                          "Rule": "tracking stops where FA < FAThreshold or the ODF's peak amplitude < FODCutoff x "
                                  "FODReference (one map, min(FA / FAThreshold, amplitude / (FODCutoff x "
                                  "FODReference)), interpolated trilinearly, stops below 1)",
                          "Interpolation": "trilinear", "Mask": "brain mask"})
    if m in ("fa", "gfa"):
        if m == "gfa" and gfa is None:
            gfa = gfa_from_sh(sh)
        scalar = (fa if m == "fa" else gfa).astype(np.float32) * mask
        return dict(kw=dict(stopping=scalar, stop_threshold=opts.stop_threshold), method="threshold",
                    desc={"Method": f"{m.upper()} threshold", "Threshold": opts.stop_threshold,
                          "Interpolation": "trilinear", "Mask": "brain mask"})
    if m == "mask":
        return dict(kw=dict(stopping=mask.astype(np.float32), stop_threshold=0.5), method="threshold",
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
    return dict(kw=dict(include_map=include, exclude_map=exclude), method=m, desc=desc)


# ----------------------------------------------------------------------------- running
def bootstrap_data(maps: RunMaps):
    """The residual bootstrap's inputs: the ODF fit's shell (the lowest), its b=0 and matrices."""
    from kernels.engine import bootstrap_arrays

    from .models import B0_THRESHOLD, ODF_SMOOTH, shell_selection, shells
    if maps.dwi is None or maps.gtab is None:
        raise ValueError("the residual bootstrap needs the DWI and its gradient table")
    bvals = np.asarray(maps.gtab.bvals, dtype=np.float64)
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise InputDataError("the residual bootstrap needs at least one b=0 volume")
    sel = shell_selection(bvals, shells(bvals)[:1]) & ~b0     # the lowest shell, as the ODF fit uses
    data = np.asarray(maps.dwi, dtype=np.float32)
    return bootstrap_arrays(data[..., sel], data[..., b0].mean(axis=-1), np.asarray(maps.gtab.bvecs)[sel],
                            maps.sh_order, maps.odf_model, smooth=ODF_SMOOTH, mask=maps.mask)


def _set_threads(n: int | None) -> None:
    if n:
        import numba
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def track_run(opts: Tracking, maps: RunMaps, out_path: Path, *, device: str = "auto", gpus=None,
              memory_budget: int | None = None, nthreads: int | None = None, progress: bool = True,
              sidecar: dict | None = None) -> dict:
    """Track one DWI run and write ``out_path`` (+ JSON sidecar); return run statistics."""
    from kernels.api import TrackingRun

    if not opts.enabled:
        raise ValueError("tracking is disabled (--tracking none)")
    if opts.learned:
        from .learned import track_learned_run
        return track_learned_run(opts, maps, out_path, device=device, nthreads=nthreads, progress=progress,
                                 sidecar=sidecar)
    check_algorithm_model(opts.algorithm, maps.odf_model)
    affine = np.asarray(maps.affine, dtype=np.float64)
    mask = np.asarray(maps.mask, dtype=bool)
    fa = np.nan_to_num(np.asarray(maps.fa, dtype=np.float32))
    if maps.sh.shape[:3] != mask.shape or fa.shape != mask.shape:
        raise InputDataError(f"map shapes differ: sh {maps.sh.shape[:3]}, fa {fa.shape}, mask {mask.shape}")
    _set_threads(nthreads)
    t0 = time.perf_counter()
    step = opts.step_size if opts.step_size is not None else 0.5 * float(voxel_sizes(affine).min())
    stopping = stopping_maps(opts, mask=mask, fa=fa, gfa=maps.gfa, sh=maps.sh, tissue=maps.tissue,
                             odf_model=maps.odf_model)
    seeds_mask, seed_desc = seed_region(opts, mask=mask, fa=fa, tissue=maps.tissue, affine=affine)
    per_voxel = opts.seeds_per_voxel if opts.n_seeds is None else None
    with flag_errors(device):
        params = opts.kernel_params(step_size=step, stop_method=stopping["method"])
        run = TrackingRun(maps.sh, affine, basis="tournier07", legacy=False, frame=maps.sh_frame, seeds=seeds_mask,
                          mask=mask, params=params, n_seeds=opts.n_seeds, seeds_per_voxel=per_voxel,
                          device=device, gpus=gpus, sphere=opts.sphere, odf_mode=opts.odf_mode,
                          memory_budget=memory_budget,
                          bootstrap=bootstrap_data(maps) if opts.algorithm == "boot" else None,
                          **stopping["kw"])
    data, seeder = run.data, run.seeder
    chunk = run.chunk_size(opts.chunk_size)
    log.info("tracking %s on %s: %d seeds in %s, step %.3g mm, chunks of %d, ODF as %s",
             opts.algorithm, run.device, seeder.total, seed_desc, step, chunk, data.odf_mode)

    n_streamlines, n_points, track_seconds = write_chunks(run.chunks(chunk, progress=progress), out_path, opts,
                                                          affine, mask.shape, step)
    seconds = time.perf_counter() - t0

    stats = {"n_seeds": seeder.total, "n_streamlines": n_streamlines, "n_points": n_points,
             "seconds": round(seconds, 3), "tracking_seconds": round(track_seconds, 3),
             "device": run.device, "odf_mode": data.odf_mode, "step_size": step}
    side = dict(sidecar or {})
    side.update(_bep046_sidecar(opts, data, stopping, seed_desc, seeder, stats, maps))
    write_json(sidecar_path(out_path), side)
    log.info("%d streamlines (%d points) from %d seeds in %.1f s (%.0f seeds/s)", n_streamlines,
             n_points, seeder.total, track_seconds, seeder.total / max(track_seconds, 1e-9))
    return stats


def write_chunks(chunks, out_path: Path, opts: Tracking, affine, shape, step: float):
    """Stream chunks of streamlines into ``out_path``; returns (streamlines, points, seconds)."""
    from .trx_writer import TrxStreamWriter

    dps = {"seed_index": ("int64", 1), "length": ("float32", 1), "seed": ("float32", 3)}
    n_streamlines = n_points = 0
    t0 = time.perf_counter()
    with TrxStreamWriter(out_path, affine, shape, dps=dps, float16=opts.float16,
                         fmt=opts.tractogram_format) as writer:
        for ch in chunks:
            lengths_mm = ((ch.lengths - 1) * step).astype(np.float32)
            writer.append(ch.positions, ch.lengths, dps={"seed_index": ch.seed_index, "length": lengths_mm,
                                                         "seed": ch.seed_points})
            n_streamlines += len(ch.lengths)
            n_points += len(ch.positions)
        seconds = time.perf_counter() - t0
    return n_streamlines, n_points, seconds


def _bep046_sidecar(opts: Tracking, data, stopping, seed_desc, seeder, stats, maps: RunMaps) -> dict:
    p = data.params
    seeding = seeding_description(seed_desc, seeder, stats["n_seeds"], (
        "ODF peaks at the seed (relative threshold "
        f"{p.rel_peak_threshold}, min separation {p.min_separation_angle} deg), up to {p.max_cross}"))
    propagation = {"Algorithm": ALGORITHM_NAMES[p.algorithm], "Model": maps.odf_model.upper(),
                   "SphericalHarmonicOrder": int(maps.sh_order), "StepSize": p.step_size,
                   "StepSizeUnit": "mm", "MaxAngle": p.max_angle,
                   "PMFThreshold": p.pmf_threshold, "Interpolation": "trilinear",
                   "Sphere": f"{opts.sphere} (hemisphere, {data.n_directions} directions)",
                   "ODFEvaluation": ("pre-sampled on the sphere" if data.odf_mode == "sf"
                                     else "SH evaluated on the fly"),
                   "RandomNumberGenerator": "counter-based SplitMix64 keyed on (rng seed, seed index)",
                   "RandomSeed": p.rng_seed}
    if p.algorithm == "ptt":
        propagation.update({"ProbeLength": p.ptt_probe_length, "ProbePoints": p.ptt_probe_points,
                            "MaxCurvature": round(float(np.radians(p.max_angle) / p.step_size), 6),
                            "MaxTries": p.ptt_max_tries})
    elif p.algorithm == "boot":
        propagation.update({"BootstrapModel": maps.odf_model.upper(),
                            "BootstrapVolumes": data.bootstrap.n_volumes, "MaxTries": p.boot_max_tries,
                            "Residuals": "leverage-corrected, resampled with replacement"})
    elif p.algorithm == "prob":
        propagation["Cone"] = "only directions within MaxAngle of the previous step"
    acceptance = {"MinimumLength": p.min_length, "MaximumLength": p.max_length, "LengthUnit": "mm",
                  "MaximumLengthRule": "tracking stops when the joined streamline reaches it"}
    if stopping["method"] in ("act", "cmc"):
        acceptance["AnatomicalConstraint"] = "both ends must stop in the include map (or leave the image)"
    return sidecar_document(opts, stats, f"Whole-brain tractography ({ALGORITHM_NAMES[p.algorithm]})",
                            seeding, propagation, stopping["desc"], acceptance, p.step_size, p.rng_seed)


def seeding_description(seed_desc: str, seeder, n_seeds: int, initial: str) -> dict:
    seeding = {"Region": seed_desc, "NumberOfSeeds": n_seeds,
               "Placement": ("uniform random within each voxel, "
                             + (f"{seeder.per_voxel} per voxel" if seeder.per_voxel
                                else "voxels drawn at random")),
               "InitialDirections": initial, "Bidirectional": True}
    if seeder.per_voxel:
        seeding["SeedsPerVoxel"] = seeder.per_voxel
    return seeding


def sidecar_document(opts: Tracking, stats: dict, description: str, seeding: dict, propagation: dict,
                     termination: dict, acceptance: dict, step: float, rng_seed: int) -> dict:
    """The BEP046 tractogram sidecar, with the run's timings and counts."""
    return {
        "Description": description,
        "StreamlineSeeding": seeding,
        "StreamlinePropagation": propagation,
        "StreamlineTermination": termination,
        "StreamlineAcceptanceCriteria": acceptance,
        "StepSize": step,
        "NumberOfSeeds": stats["n_seeds"],
        "NumberOfStreamlines": stats["n_streamlines"],
        "RandomSeed": rng_seed,
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
