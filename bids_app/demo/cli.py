"""``tractoscale demo-data OUT ...``: write the simulated demo BIDS dataset."""
from __future__ import annotations

import argparse
import logging
import math
import sys

from ..errors import TractoscaleError, UsageError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``demo-data``.  Values are checked in :func:`run` (bad ones raise UsageError)."""
    parser.add_argument("out_dir", help="folder to create (a previous demo dataset is replaced)")
    parser.add_argument("--subjects", default="4", metavar="N",
                        help="number of subjects (default 4)")
    parser.add_argument("--size", default="small", metavar="{small,full,hcp}",
                        help="small: 40x48x32 at 2.5 mm, seconds; full: 90x108x90 at 2 mm; hcp: the full "
                             "phantom on an HCP-sized grid, 145x174x145 at 1.25 mm, 3 shells (b=1000, 2000, "
                             "3000) of 90 directions and 18 b=0 (288 volumes; about 1.5 GB, minutes)")
    parser.add_argument("--seed", default="0", metavar="S", help="random seed (default 0)")
    parser.add_argument("--sessions", default="0", metavar="N",
                        help="sessions per subject (default 0: no ses- level)")
    parser.add_argument("--shells", default=None, metavar="B[,B...]",
                        help="comma-separated b-values in s/mm^2 (default 1000; hcp: 1000,2000,3000)")
    parser.add_argument("--directions", default=None, metavar="N",
                        help="gradient directions per shell, >= 6 (default 32; hcp: 90)")
    parser.add_argument("--snr", default="30", metavar="SNR",
                        help="b0 signal-to-noise ratio in white matter (default 30)")
    parser.add_argument("--t1w", action="store_true", help="also write anat/*_T1w.nii.gz")


def _int(value, name: str, minimum: int) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise UsageError(f"--{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise UsageError(f"--{name} must be >= {minimum}, got {v}")
    return v


def parse_options(args) -> dict:
    """Turn the parsed (string) options into keyword arguments of ``make_demo_dataset``."""
    size = str(args.size).strip().lower()
    if size not in ("small", "full", "hcp"):
        raise UsageError(f"--size must be 'small', 'full' or 'hcp', got {args.size!r}")
    hcp = size == "hcp"
    shells_arg = args.shells if args.shells is not None else ("1000,2000,3000" if hcp else "1000")
    directions = args.directions if args.directions is not None else ("90" if hcp else "32")
    try:
        shells = tuple(float(b) for b in str(shells_arg).split(",") if b.strip())
    except ValueError:
        raise UsageError(f"--shells must be comma-separated numbers, got {args.shells!r}") from None
    if not shells or any(not math.isfinite(b) or b <= 0 for b in shells):
        raise UsageError(f"--shells must be positive b-values, got {args.shells!r}")
    try:
        snr = float(args.snr)
    except ValueError:
        raise UsageError(f"--snr must be a number, got {args.snr!r}") from None
    if not math.isfinite(snr) or snr <= 0:
        raise UsageError(f"--snr must be > 0, got {args.snr!r}")
    return dict(
        n_subjects=_int(args.subjects, "subjects", 1), size=size,
        seed=_int(args.seed, "seed", 0), sessions=_int(args.sessions, "sessions", 0),
        shells=shells, n_directions=_int(directions, "directions", 6), snr=snr,
        t1w=bool(args.t1w),
    )


def run(args) -> int:
    """Write the dataset; returns 0.  User mistakes raise :class:`UsageError`."""
    from .dataset import make_demo_dataset

    opts = parse_options(args)
    path = make_demo_dataset(args.out_dir, **opts)
    log.info("demo dataset written to %s", path)
    print(path)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m bids_app.demo``)."""
    parser = argparse.ArgumentParser(prog="tractoscale demo-data",
                                     description="Write a simulated BIDS diffusion dataset.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except TractoscaleError as exc:
        print(f"tractoscale demo-data: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
