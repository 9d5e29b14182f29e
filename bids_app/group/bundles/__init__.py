"""Atlas-based bundle segmentation by optimal transport, and tract profiles (group level).

Modules: :mod:`.fibres` (fibre vectors), :mod:`.ot` (unbalanced multiscale Sinkhorn, kernels in
:mod:`kernels.sinkhorn`), :mod:`.segment` (OT and nearest-centroid label transfer),
:mod:`.align` (label-free tractogram affine), :mod:`.space` (native -> atlas space),
:mod:`.profiles`, :mod:`.figures`, :mod:`.outputs` (file layout), :mod:`.app` (the group step).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The "bundle segmentation" option group."""
    g = parser.add_argument_group(
        "bundle segmentation",
        "group level: label each participant's streamlines with an atlas (optimal transport), "
        "then tract profiles of FA/MD/AD/RD")
    g.add_argument("--atlas", type=Path, default=None, metavar="TRX",
                   help="bundle atlas: a TRX whose groups are the bundle labels, in the group's common space "
                        "(default for the demo dataset: its own sourcedata/groundtruth/template atlas)")
    g.add_argument("--atlas-space", default=None, metavar="SPACE",
                   help="space of the atlas (default: NAME of a tpl-NAME_*.trx file name); when the TBSS "
                        "common space differs, the mapped tractogram is refined by an affine fit onto "
                        "the atlas")
    g.add_argument("--atlas-max-fibres", type=int, default=None, metavar="N",
                   help="use at most N random fibres of each atlas bundle (faster on large atlases)")
    g.add_argument("--no-atlas-fragments", action="store_true",
                   help="do not add fragments of the atlas fibres (by default 9 sub-fibres of 75%%, 50%% "
                        "and 30%% of each fibre's length are added, so partial streamlines match; this "
                        "makes the atlas 10x larger)")
    g.add_argument("--seg-method", choices=("ot", "centroid"), default="ot",
                   help="label transfer: unbalanced optimal transport (default) or the nearest-centroid "
                        "baseline")
    g.add_argument("--seg-transform", choices=("auto", "tbss", "affine", "none"), default="auto",
                   help="native -> atlas space: the TBSS transforms (tbss), a label-free affine fit of the "
                        "tractogram onto the atlas (affine), both when needed (auto, default), or none")
    g.add_argument("--seg-track", default="auto", metavar="METHOD",
                   help="which participant tractogram to segment: prob, ptt, det or boot "
                        "(default: the first present in that order)")
    g.add_argument("--ot-blur", type=float, default=3.0, metavar="MM",
                   help="smallest distance scale of the transport (final entropic blur, default 3 mm)")
    g.add_argument("--ot-reach", type=float, default=None, metavar="MM",
                   help="distance scale beyond which mass may be dropped (unbalanced transport): fibres "
                        "farther than about 1.5-2 x reach from every atlas fibre become outliers "
                        "(default 20 mm; 5 mm with the demo phantom's atlas, which is half brain size)")
    g.add_argument("--ot-scaling", type=float, default=0.9, metavar="S",
                   help="epsilon annealing: blur shrinks by this factor per iteration (default 0.9)")
    g.add_argument("--ot-outlier-level", type=float, default=0.2, metavar="F",
                   help="outlier class level: a fibre sending less than this fraction of its mass to "
                        "every bundle is an outlier (default 0.2)")
    g.add_argument("--ot-clusters", type=int, default=None, metavar="K",
                   help="K-means clusters of the multiscale solver (default: ~n/32, at most 1000)")
    g.add_argument("--n-profile-nodes", type=int, default=100, metavar="N",
                   help="nodes per tract profile (default 100)")
    g.add_argument("--skip-segmentation", action="store_true",
                   help="group level: run TBSS only, no bundle segmentation")


def run_segmentation(*, bids_dir, output_dir, participants, args, executor) -> dict:
    """Segment the participants' tractograms with the atlas; write bundles, profiles, figures.

    ``participants``: ``[{"sub": "01"}, ...]`` or None for all; ``executor``: a
    ``concurrent.futures.Executor`` (or None to run here).  Returns a summary dict.
    """
    from .app import run_segmentation as _run
    return _run(bids_dir=bids_dir, output_dir=output_dir, participants=participants, args=args,
                executor=executor)


__all__ = ["add_arguments", "run_segmentation"]
