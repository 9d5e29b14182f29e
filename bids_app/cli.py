"""Command line: ``tractoscale bids_dir output_dir {participant,group} [options]``.

Also ``tractoscale demo-data OUT`` to write the built-in demo dataset.
User mistakes end with a one-line message and an exit code of the BIDS
execution spec (see :mod:`bids_app.errors`); never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_USAGE, TractoscaleError, UnknownLevelError, UsageError

LEVELS = ("participant", "group")
log = logging.getLogger("tractoscale")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error maps to exit 64."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _labels(values):
    return [v[4:] if v.startswith("sub-") else v for v in values]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tractoscale",
        description="BIDS App for diffusion MRI: DTI and ODF model maps, GPU/CPU tractography, "
        "TBSS-style group statistics and atlas-based bundle segmentation.",
        epilog="Also: 'tractoscale demo-data OUT' writes the built-in demo dataset "
        "('tractoscale demo-data --help').",
    )
    p.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where derivatives are written (created if missing)")
    p.add_argument("analysis_level", help="'participant' (one subject at a time; parallel runs are safe) "
                   "or 'group' (reads the participant outputs)")
    p.add_argument("--version", action="version", version=f"tractoscale {__version__}")

    g = p.add_argument_group("selection")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   dest="participant_label",
                   help="subjects to process, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL", dest="session_label",
                   help="sessions to process, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
                   dest="bids_filter_file",
                   help='JSON with pybids entities to select the DWI, e.g. {"dwi": {"acquisition": "hardi"}}')
    g.add_argument("--input-derivatives", type=Path, metavar="DIR",
                   help="preprocessed DWI (e.g. QSIPrep output with desc-preproc_dwi), preferred over raw")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   dest="skip_bids_validation", help="do not run the BIDS validator on bids_dir")
    g.add_argument("--bids-database-dir", "--bids_database_dir", type=Path, metavar="DIR",
                   dest="bids_database_dir",
                   help="reuse (or create) a pybids database here; default: a fresh one in the work dir")

    r = p.add_argument_group("resources")
    r.add_argument("-w", "--work-dir", type=Path, metavar="DIR", dest="work_dir",
                   help="scratch folder (default: a temporary folder, removed at the end)")
    r.add_argument("--nthreads", "--n_cpus", type=int, default=None, metavar="N",
                   help="CPU threads for tracking and model fits (default: all available)")
    r.add_argument("--omp-nthreads", type=int, default=None, metavar="N",
                   help="threads per process for BLAS/OpenMP (default: --nthreads)")
    r.add_argument("--mem", default=None, metavar="GB", help="memory limit hint in GB (chunk sizes)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="tractography/OT kernels: CUDA if a GPU is present (auto), or force one")

    m = p.add_argument_group("models")
    m.add_argument("--odf-model", choices=("csa", "opdt", "csd"), default="csd",
                   help="ODF model fitted after DTI (default: csd)")
    m.add_argument("--sh-order", type=int, default=None, metavar="L",
                   help="maximum spherical-harmonic order (even; default: 8, lowered to fit the number of "
                        "gradient directions)")

    o = p.add_argument_group("output")
    o.add_argument("--force", action="store_true",
                   help="recompute outputs that already exist and are complete")
    o.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v info, -vv debug)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")

    for add in _option_groups():
        add(p)
    return p


def _option_groups():
    """argparse groups owned by the feature modules."""
    from . import tracking
    from .group import bundles, tbss
    return [tracking.add_arguments, tbss.add_arguments, bundles.add_arguments]


def _setup_logging(verbosity: int):
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("tractoscale").setLevel(min(level, logging.INFO))
    for noisy in ("numba", "bids", "matplotlib", "distributed", "asyncio", "h5py", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # trx-python logs its temporary folders with logging.info() on the root logger; a filter on
    # the root logger drops them for every handler, the per-run log files included
    logging.getLogger().addFilter(_quiet_root_info)


def _quiet_root_info(record: logging.LogRecord) -> bool:
    return record.name != "root" or record.levelno >= logging.WARNING


def _run_demo_data(argv) -> int:
    from .demo import cli as demo_cli
    p = _Parser(prog="tractoscale demo-data",
                description="Write the built-in demo BIDS dataset (simulated white-matter phantom "
                            "with ground truth under sourcedata/groundtruth).")
    demo_cli.add_arguments(p)
    args = p.parse_args(argv)
    _setup_logging(1)
    return demo_cli.run(args)


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo-data":
        return _run_demo_data(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    level = args.analysis_level
    if level not in LEVELS:
        raise UnknownLevelError(f"unknown analysis level '{level}': choose one of {', '.join(LEVELS)}")
    args.participant_label = _labels(args.participant_label) if args.participant_label else None
    args.session_label = ([s[4:] if s.startswith("ses-") else s for s in args.session_label]
                          if args.session_label else None)
    if args.nthreads is not None and args.nthreads < 1:
        raise UsageError("--nthreads must be >= 1")
    if args.sh_order is not None and (args.sh_order < 2 or args.sh_order % 2):
        raise UsageError("--sh-order must be an even number >= 2")
    _limit_threads(args)
    if level == "participant":
        from .workflows.participant import run_participant_level
        return run_participant_level(args)
    from .workflows.group import run_group_level
    return run_group_level(args)


def _limit_threads(args):
    n = args.omp_nthreads or args.nthreads
    if n:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(n))
    if args.nthreads:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(min(args.nthreads, os.cpu_count() or 1)))


def _ensure_numba_cache_dir():
    """Numba's cache must be writable or every cached kernel import fails; fall back to a private
    temporary folder (e.g. another user's /tmp/numba_cache on a shared cluster node)."""
    import tempfile
    path = os.environ.get("NUMBA_CACHE_DIR")
    if path:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK | os.X_OK):
                return
        except OSError:
            pass
    elif os.access(Path.home(), os.W_OK):
        return  # numba's default (beside the package or in ~/.cache) is usable
    # a private folder that stays the same between runs, so kernels compile once per user and node
    mine = Path(tempfile.gettempdir()) / f"tractoscale-numba-{os.getuid()}"
    try:
        mine.mkdir(mode=0o700, exist_ok=True)
        st = mine.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(mine, os.W_OK | os.X_OK):
            os.environ["NUMBA_CACHE_DIR"] = str(mine)
            return
    except OSError:
        pass
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tractoscale-numba-")


def main(argv=None) -> int:
    _ensure_numba_cache_dir()
    try:
        code = run(argv)
    except TractoscaleError as exc:
        print(f"tractoscale: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("tractoscale: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["build_parser", "main", "run", "EXIT_USAGE"]
