"""Command line: ``tractoscale bids_dir output_dir {participant,group} [options]``.

Also ``tractoscale demo-data OUT`` to write the built-in demo dataset, and ``tractoscale train-tracker
MODEL ...`` to train a learned tracker (:mod:`bids_app.train_tracker`), ``tractoscale train-angular-sr
MODEL ...`` to train an angular super-resolution network (:mod:`bids_app.angular_sr.cli`).  The options are declared in
:mod:`bids_app.config`; this module parses them into a :class:`~bids_app.config.Config`, sets up the
process (logging, threads), runs the checks that need no data (:mod:`bids_app.preflight`), and hands
the Config to a workflow.  User mistakes end with a one-line message and an exit code of the BIDS
execution spec (see :mod:`bids_app.errors`); never a traceback.
"""
from __future__ import annotations

import logging
import sys

from .config import LEVELS, Config, Parser, build_parser
from .errors import EXIT_USAGE, TractoscaleError
from .resources import ensure_numba_cache_dir, limit_threads

log = logging.getLogger("tractoscale")


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
    p = Parser(prog="tractoscale demo-data",
               description="Write the built-in demo BIDS dataset (simulated white-matter phantom "
                           "with ground truth under sourcedata/groundtruth).")
    demo_cli.add_arguments(p)
    args = p.parse_args(argv)
    _setup_logging(1)
    return demo_cli.run(args)


def _run_train_tracker(argv) -> int:
    from . import train_tracker
    _setup_logging(1)
    return train_tracker.main(argv)


def _run_train_angular_sr(argv) -> int:
    from .angular_sr import cli as sr_cli
    _setup_logging(1)
    return sr_cli.main(argv)


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo-data":
        return _run_demo_data(argv[1:])
    if argv and argv[0] == "train-tracker":
        return _run_train_tracker(argv[1:])
    if argv and argv[0] == "train-angular-sr":
        return _run_train_angular_sr(argv[1:])
    config = Config.from_argv(argv)
    _setup_logging(config.execution.verbose)
    limit_threads(config.resources)
    from .preflight import preflight
    preflight(config)
    if config.analysis_level == "participant":
        from .workflows.participant import run_participant_level
        return run_participant_level(config)
    from .workflows.group import run_group_level
    return run_group_level(config)


def main(argv=None) -> int:
    ensure_numba_cache_dir()
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


__all__ = ["build_parser", "main", "run", "EXIT_USAGE", "LEVELS"]
