"""Atlas-based bundle segmentation by optimal transport, and tract profiles (group level).

Modules: :mod:`.fibres` (fibre vectors), :mod:`.ot` (unbalanced multiscale Sinkhorn, kernels in
:mod:`kernels.sinkhorn`), :mod:`.segment` (OT and nearest-centroid label transfer),
:mod:`.align` (label-free tractogram affine), :mod:`.space` (native -> atlas space),
:mod:`.profiles`, :mod:`.figures`, :mod:`.outputs` (file layout), :mod:`.app` (the group step).
"""
from __future__ import annotations


def run_segmentation(*, bids_dir, output_dir, participants, options, executor, device: str = "auto",
                     sessions=None, force: bool = False, progress: bool = True) -> dict:
    """Segment the participants' tractograms with the atlas; write bundles, profiles, figures.

    ``options``: :class:`bids_app.config.Segmentation`; ``participants``: ``[{"sub": "01"}, ...]`` or
    None for all; ``executor``: a ``concurrent.futures.Executor`` (or None to run here).  Returns a
    summary dict.
    """
    from .app import run_segmentation as _run
    return _run(bids_dir=bids_dir, output_dir=output_dir, participants=participants, options=options,
                executor=executor, device=device, sessions=sessions, force=force, progress=progress)


__all__ = ["run_segmentation"]
