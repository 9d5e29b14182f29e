"""``--tracking learned``: a network from ``tractoscale train-tracker`` tracks one DWI run.

The library (:mod:`kernels.learned`) holds the networks, the batched tracker and the model file
format; this module checks a model file before any work (:func:`check_model_file`, called by
:mod:`bids_app.preflight`), checks that a run's data can feed the model (:func:`check_run`, before
that run's stages), and writes the tractogram and its sidecar like the other algorithms.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from .config import Tracking, flag_errors
from .derivatives import sidecar_path, write_json
from .errors import InputDataError, UsageError

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'tractoscale[learn]'"


def require_learn_extra(what: str = "--tracking learned") -> None:
    """A one-line usage error when PyTorch or safetensors is missing (found without importing them)."""
    from kernels.learned import missing_dependencies
    missing = missing_dependencies()
    if missing:
        raise UsageError(f"{what} needs {' and '.join(missing)} (the 'learn' extra): {EXTRA_HINT}")


def training_record(entries: list, settings, device: str, **extra) -> dict:
    """The provenance a trained model file carries (train-tracker, train-angular-sr): software, time,
    training data, settings, device and threads, plus ``extra``."""
    import datetime
    from dataclasses import asdict

    import torch

    from . import __version__
    return {"Software": f"tractoscale {__version__}",
            "Created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "Data": entries, "Settings": asdict(settings), "Device": device,
            "Threads": torch.get_num_threads(), **extra}


@contextlib.contextmanager
def model_errors(data: str = "the data cannot feed this model"):
    """The library's model-file and data errors as bad input data (exit 65); ``data`` starts the
    message of a data error."""
    from kernels.errors import DataError, ModelFileError
    try:
        yield
    except ModelFileError as exc:
        raise InputDataError(f"model file {exc.path}: {exc.problem}") from None
    except DataError as exc:
        raise InputDataError(f"{data}: {exc}") from None


def check_model_file(path):
    """The model file's header: readable, complete, a tractoscale tracker of a known format."""
    from kernels.learned.modelfile import read_info
    with model_errors():
        return read_info(path)


def check_run(bval_path: Path, info) -> None:
    """Before a run's stages: its gradient table has the model's shell with enough directions."""
    from kernels.learned.signal import check_order, pick_shell

    try:
        bvals = np.loadtxt(bval_path, ndmin=1, dtype=float).ravel()
    except (OSError, ValueError):
        return    # unreadable tables are reported, with their file name, when the DWI is loaded
    with model_errors(f"{Path(bval_path).name}: the data cannot feed the model {Path(info.path).name}"):
        check_order(bvals, pick_shell(bvals, info.inputs.shell), info.inputs.sh_order)


def prepare_torch(nthreads: int | None = None) -> None:
    """Import PyTorch with its OpenMP threads sleeping when idle (spinning threads slow it down many
    times over when the cores are shared), and use ``nthreads`` threads (default: all available)."""
    import os
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # read when PyTorch's OpenMP library loads
    import torch
    torch.set_num_threads(max(1, int(nthreads or len(os.sched_getaffinity(0)))))


def track_learned_run(opts: Tracking, maps, out_path: Path, *, device: str = "auto", nthreads: int | None = None,
                      progress: bool = True, sidecar: dict | None = None) -> dict:
    """Track one DWI run with the model of ``--tracking-model``; write ``out_path`` and its sidecar."""
    from kernels.learned.api import LearnedTrackingRun

    from .tracking import seed_region, seeding_description, sidecar_document, stopping_maps, write_chunks

    require_learn_extra()
    if maps.dwi is None or maps.gtab is None:
        raise ValueError("learned tracking needs the DWI and its gradient table")
    affine = np.asarray(maps.affine, dtype=np.float64)
    mask = np.asarray(maps.mask, dtype=bool)
    fa = np.nan_to_num(np.asarray(maps.fa, dtype=np.float32))
    prepare_torch(nthreads)
    t0 = time.perf_counter()
    stopping = stopping_maps(opts, mask=mask, fa=fa, gfa=maps.gfa, sh=maps.sh, tissue=None)
    seeds_mask, seed_desc = seed_region(opts, mask=mask, fa=fa, tissue=maps.tissue, affine=affine)
    per_voxel = opts.seeds_per_voxel if opts.n_seeds is None else None
    with flag_errors(device), model_errors():
        run = LearnedTrackingRun(opts.tracking_model, maps.dwi, maps.gtab.bvals, maps.gtab.bvecs, affine,
                                 frame="voxel", seeds=seeds_mask, mask=mask, n_seeds=opts.n_seeds,
                                 seeds_per_voxel=per_voxel, device=device, max_angle=opts.max_angle,
                                 min_length=opts.min_length, max_length=opts.max_length,
                                 direction=opts.learned_direction, rng_seed=opts.rng_seed, **stopping["kw"])
    p, info = run.params, run.info
    chunk = run.chunk_size(opts.chunk_size)
    log.info("tracking with the learned model %s on %s: %d seeds in %s, step %.3g mm, chunks of %d",
             Path(opts.tracking_model).name, run.device, run.n_seeds, seed_desc, p.step_size, chunk)
    n_streamlines, n_points, track_seconds = write_chunks(run.chunks(chunk, progress=progress), out_path, opts,
                                                          affine, mask.shape, p.step_size)
    stats = {"n_seeds": run.n_seeds, "n_streamlines": n_streamlines, "n_points": n_points,
             "seconds": round(time.perf_counter() - t0, 3), "tracking_seconds": round(track_seconds, 3),
             "device": run.device, "step_size": p.step_size}
    seeding = seeding_description(seed_desc, run.seeder, run.n_seeds, (
        "the model's direction at the seed (no history); after the first half, the model reads it back "
        "to the seed and continues the other way"))
    propagation = {"Algorithm": "learned", "Model": info.describe(),
                   "Direction": ("the most probable direction" if p.direction == "max"
                                 else "drawn from the model's distribution"),
                   "StepSize": p.step_size, "StepSizeUnit": "mm", "MaxAngle": p.max_angle,
                   "Interpolation": "trilinear (the signal's SH coefficients and the stopping map)",
                   "RandomNumberGenerator": "counter-based SplitMix64 keyed on (rng seed, seed index)",
                   "RandomSeed": p.rng_seed}
    termination = {**stopping["desc"], "EndOfStreamline": f"the model's end-of-streamline probability > "
                                                         f"{p.eos_threshold}",
                   "NoDirection": "no direction offered within MaxAngle of the previous step"}
    acceptance = {"MinimumLength": p.min_length, "MaximumLength": p.max_length, "LengthUnit": "mm",
                  "MaximumLengthRule": "tracking stops when the joined streamline reaches it"}
    side = dict(sidecar or {})
    side.update(sidecar_document(opts, stats, "Whole-brain tractography (learned model: "
                                 f"{info.architecture.description})", seeding, propagation, termination,
                                 acceptance, p.step_size, p.rng_seed))
    write_json(sidecar_path(out_path), side)
    log.info("%d streamlines (%d points) from %d seeds in %.1f s (%.0f seeds/s)", n_streamlines, n_points,
             run.n_seeds, track_seconds, run.n_seeds / max(track_seconds, 1e-9))
    return stats
