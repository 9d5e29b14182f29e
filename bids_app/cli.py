"""Command line: ``tractoscale bids_dir output_dir {participant,group} [options]``.

Also ``tractoscale demo-data OUT`` to write the built-in demo dataset, ``tractoscale install-viewer``
to install the reports' 3D viewer (niivue, from the npm registry), ``tractoscale train-tracker
MODEL ...`` to train a learned tracker (:mod:`bids_app.train_tracker`) and ``tractoscale train-angular-sr
MODEL ...`` to train an angular super-resolution network (:mod:`bids_app.angular_sr.cli`).  The options are declared in
:mod:`bids_app.config`; this module parses them into a :class:`~bids_app.config.Config`, sets up the
process (logging, threads), runs the checks that need no data (:mod:`bids_app.preflight`), and hands
the Config to a workflow.  User mistakes end with a one-line message and an exit code of the BIDS
execution spec (see :mod:`bids_app.errors`); never a traceback.
"""
from __future__ import annotations

import logging
import signal
import sys

from . import resources
from .config import LEVELS, Config, Parser, build_parser
from .errors import EXIT_USAGE, TractoscaleError, describe_os_error
from .resources import ensure_numba_cache_dir, isolate_imports, limit_threads

log = logging.getLogger("tractoscale")


def _setup_logging(verbosity: int):
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("tractoscale").setLevel(min(level, logging.INFO))
    for noisy in ("numba", "bids", "matplotlib", "distributed", "asyncio", "h5py", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # a log file on a full disk must not print tracebacks ("--- Logging error ---") between the
    # messages; the fault itself is reported where the outputs fail to be written
    logging.raiseExceptions = False
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
    _numba_cache()
    return demo_cli.run(args)


def _run_install_viewer(argv) -> int:
    from pathlib import Path

    from .reports import viewer
    p = Parser(prog="tractoscale install-viewer",
               description=f"Install the reports' interactive 3D viewer: the browser build of niivue "
                           f"{viewer.NIIVUE_VERSION} (BSD-2-Clause), fetched with npm from the npm registry and "
                           "checked against its pinned hash. Reports written afterwards copy it into the "
                           "output folder, so they open offline.")
    p.add_argument("--dest", type=Path, default=None, metavar="DIR",
                   help=f"install folder (default: {viewer.default_install_dir()}); elsewhere, point "
                        f"${viewer.ENV_VAR} at it")
    p.add_argument("--tarball", type=Path, default=None, metavar="TGZ",
                   help=f"use this file of 'npm pack {viewer.NIIVUE_PACKAGE}@{viewer.NIIVUE_VERSION}' "
                        "instead of running npm (machines with no network)")
    p.add_argument("--force", action="store_true", help="install again even if this version is there")
    args = p.parse_args(argv)
    path = viewer.install(args.dest, args.tarball, force=args.force)
    print(f"niivue {viewer.NIIVUE_VERSION} installed: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _numba_cache() -> None:
    """A private Numba cache folder, chosen before anything imports numba (logging is set up)."""
    ensure_numba_cache_dir()
    if resources.numba_cache_note:
        log.info(resources.numba_cache_note)


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
    if argv and argv[0] == "install-viewer":
        return _run_install_viewer(argv[1:])
    if argv and argv[0] == "train-tracker":
        return _run_train_tracker(argv[1:])
    if argv and argv[0] == "train-angular-sr":
        return _run_train_angular_sr(argv[1:])
    config = Config.from_argv(argv)
    _setup_logging(config.execution.verbose)
    _numba_cache()
    limit_threads(config.resources)
    from .preflight import preflight
    preflight(config)
    try:
        if config.analysis_level == "participant":
            from .workflows.participant import run_participant_level
            return run_participant_level(config)
        from .workflows.group import run_group_level
        return run_group_level(config)
    except OSError as exc:   # a file system fault outside any one participant's work
        log.debug("file system error", exc_info=True)
        raise describe_os_error(exc, config.output_dir) from None


class Terminated(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's time limit, ``docker stop``): both take the same way
    out, with the same clean-up (temporary files removed, worker processes stopped)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame):
    # a second signal during the clean-up ends the process at once
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    raise Terminated(signum)


def main(argv=None) -> int:
    isolate_imports()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        code = run(argv)
    except TractoscaleError as exc:
        print(f"tractoscale: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"tractoscale: interrupted ({signal.Signals(signum).name}); unfinished steps rerun next time",
              file=sys.stderr)
        code = 128 + signum
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["build_parser", "main", "run", "EXIT_USAGE", "LEVELS"]
