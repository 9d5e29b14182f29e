"""TBSS-style group analysis: registration, mean-FA skeleton, projection, permutation statistics.

Hooks for the command line: :func:`add_arguments` adds the "TBSS" option group and
:func:`run_tbss` runs the whole step (see :mod:`bids_app.group.tbss.pipeline`).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TBSS", "group level: TBSS-style skeleton statistics on FA/MD/AD/RD")
    g.add_argument("--tbss-target", default="auto", metavar="auto|TEMPLATE|FILE",
                   help="registration target: 'auto' (the most representative participant, from a coarse "
                        "all-to-all registration), a TemplateFlow template name (its WM probability map is "
                        "used; must be available offline) or a path to an FA image (default: auto)")
    g.add_argument("--tbss-space", default=None, metavar="TEMPLATE",
                   help="align the target to this TemplateFlow template so outputs are in its space "
                        "(named space-<TEMPLATE>); default: the target's own space (space-tbss)")
    g.add_argument("--skeleton-threshold", type=float, default=0.2, metavar="FA",
                   help="mean-FA threshold of the skeleton (default: 0.2)")
    g.add_argument("--stats-column", default=None, metavar="COL",
                   help="participants.tsv column to test: numeric -> correlation, two levels -> two-sample t")
    g.add_argument("--covariates", nargs="+", default=None, metavar="COL",
                   help="participants.tsv columns to regress out")
    g.add_argument("--n-permutations", type=int, default=5000, metavar="N",
                   help="permutations for the TFCE FWE correction (default: 5000)")
    g.add_argument("--permutation-seed", type=int, default=0, metavar="SEED",
                   help="random seed of the permutations (default: 0)")
    g.add_argument("--tbss-quick", action="store_true",
                   help="fewer registration iterations (previews and tests; less accurate)")
    g.add_argument("--dask-scheduler", default=None, metavar="ADDRESS|FILE",
                   help="run group-level tasks on a Dask cluster: scheduler address (tcp://host:port) or "
                        "scheduler file; default: a local process pool of --nthreads workers")


def run_tbss(*, bids_dir, output_dir, participants: list[dict] | None, args, executor) -> dict:
    """Run the TBSS step; returns a summary dict (see :func:`pipeline.run`)."""
    from .pipeline import run
    return run(bids_dir=bids_dir, output_dir=output_dir, participants=participants, args=args,
               executor=executor)


__all__ = ["add_arguments", "run_tbss"]
