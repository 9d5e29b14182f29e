"""Python API of learned tracking, in the spirit of :func:`kernels.track`::

    from kernels.learned import track_learned
    sft = track_learned("tracker.safetensors", dwi, bvals, bvecs, affine, frame="fsl",   # BIDS b-vectors
                        seeds=wm_mask, stopping=fa, stop_threshold=0.1, device="auto")

The model file says what the network reads (:class:`~.modelfile.InputSpec`): the signal of one
shell is fitted with SH of the model's order in world axes here, from the DWI and its gradient
table.  ``frame`` is the frame of ``bvecs``: ``fsl`` for BIDS/FSL ``.bvec`` files as read,
``voxel`` or ``world`` (see :mod:`kernels.frames`).  Seeds and stopping work as in
:class:`kernels.TrackingRun`.  PyTorch runs the network on CUDA when ``device`` is auto and a GPU is
visible, else on the CPU.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import engine
from ..api import make_seeder, threshold_map, to_tractogram
from ..errors import DeviceError, ParameterError
from .modelfile import load_model
from .signal import signal_sh
from .tracker import LearnedParams, LearnedTracker

DEVICES = ("auto", "cpu", "cuda")
CHUNK = {"cpu": 4096, "cuda": 65536}


def torch_device(requested: str = "auto") -> str:
    """``auto|cpu|cuda`` -> ``cpu`` or ``cuda`` for PyTorch; ``cuda`` without a GPU is a DeviceError."""
    import torch

    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise ParameterError("device", f"must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise DeviceError("CUDA was requested but PyTorch sees no GPU (a CPU-only PyTorch build, no driver, "
                          "or a container run without --nv / --gpus); use the CPU (or auto)")
    return "cuda" if available else "cpu"


class LearnedTrackingRun:
    """One learned tracking job; :meth:`chunks` yields :class:`kernels.engine.Chunk` objects.

    ``model``: a model file path, or the ``(network, ModelInfo)`` pair of
    :func:`~.modelfile.load_model`.  ``mask``: the signal is zero outside it (default: none).
    Tracking settings: the fields of :class:`~.tracker.LearnedParams` as keywords (the step is the
    model's).
    """

    def __init__(self, model, dwi, bvals, bvecs, affine, *, frame: str, seeds, stopping,
                 stop_threshold: float | None = None, mask=None, n_seeds: int | None = None,
                 seeds_per_voxel: int | None = None, device: str = "auto", **settings):
        self.device = torch_device(device)
        self.network, self.info = load_model(model, self.device) if not isinstance(model, tuple) else model
        self.network = self.network.to(self.device).eval()
        self.affine = np.asarray(affine, dtype=np.float64)
        dwi = np.asarray(dwi)
        self.shape = tuple(dwi.shape[:3])
        spec = self.info.inputs
        stop_map, threshold = threshold_map(stopping, stop_threshold, self.shape)
        self.params = LearnedParams(step_size=spec.step_mm, stop_threshold=threshold, **settings)
        self.signal = signal_sh(dwi, bvals, bvecs, self.affine, frame=frame, sh_order=spec.sh_order,
                                shell=spec.shell, mask=mask)
        self.seeder = make_seeder(seeds, self.shape, self.affine, n_seeds, seeds_per_voxel, self.params.rng_seed)
        self.tracker = LearnedTracker(self.network, spec, self.signal, self.affine, stop_map, self.params,
                                      self.device)

    @property
    def n_seeds(self) -> int:
        return self.seeder.total

    def chunk_size(self, requested: int | None = None) -> int:
        return int(requested) if requested else CHUNK[self.device]

    def chunks(self, chunk_size: int | None = None, progress: bool = False) -> Iterator[engine.Chunk]:
        from tqdm import tqdm

        total, size = self.seeder.total, self.chunk_size(chunk_size)
        aff = self.affine
        starts = range(0, total, size)
        for first in tqdm(starts, total=len(starts), unit="chunk", desc=f"learned tracking ({self.device})",
                          disable=None if progress else True):
            count = min(size, total - first)
            world = self.seeder.chunk(first, count) @ aff[:3, :3].T + aff[:3, 3]
            positions, lengths, kept = self.tracker.run(world, first + np.arange(count))
            yield engine.Chunk(positions=positions, lengths=lengths, seed_index=first + kept,
                               seed_points=world[kept].astype(np.float32), n_seeds=count)

    def tractogram(self, chunk_size: int | None = None, progress: bool = False):
        """Every streamline, as a dipy ``StatefulTractogram`` in RAS+ mm (with seed index and point)."""
        return to_tractogram(self.chunks(chunk_size, progress), self.affine, self.shape)


def track_learned(model, dwi, bvals, bvecs, affine, *, frame: str, seeds, stopping, **kwargs):
    """Track with a learned model; returns a dipy ``StatefulTractogram`` (RAS+ mm).  Arguments:
    see :class:`LearnedTrackingRun`; ``chunk_size``/``progress`` go to the run."""
    chunk_size = kwargs.pop("chunk_size", None)
    progress = kwargs.pop("progress", False)
    return LearnedTrackingRun(model, dwi, bvals, bvecs, affine, frame=frame, seeds=seeds, stopping=stopping,
                              **kwargs).tractogram(chunk_size=chunk_size, progress=progress)
