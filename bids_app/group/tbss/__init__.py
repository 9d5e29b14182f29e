"""TBSS-style group analysis: registration, mean-FA skeleton, projection, permutation statistics.

:func:`run_tbss` runs the whole step with the :class:`bids_app.config.Tbss` options
(see :mod:`bids_app.group.tbss.pipeline`).
"""
from __future__ import annotations


def run_tbss(*, bids_dir, output_dir, participants: list[dict] | None, options, executor,
             sessions=None, progress: bool = True) -> dict:
    """Run the TBSS step; returns a summary dict (see :func:`pipeline.run`)."""
    from .pipeline import run
    return run(bids_dir=bids_dir, output_dir=output_dir, participants=participants, options=options,
               executor=executor, sessions=sessions, progress=progress)


__all__ = ["run_tbss"]
