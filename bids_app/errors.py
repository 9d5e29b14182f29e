"""User-facing errors and the exit codes of the BIDS execution spec (draft).

Anything a user can cause (bad arguments, bad data, missing inputs) raises a
:class:`TractoscaleError` subclass; the CLI prints its message on one line and
exits with its ``exit_code``.  Anything else is a bug and keeps its traceback.
"""
import errno
import os
from pathlib import Path

EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73
EXIT_IO = 74


class TractoscaleError(Exception):
    """Base class: a one-line message and an exit code."""

    exit_code = EXIT_GENERIC


class UsageError(TractoscaleError):
    """Bad command-line arguments or option values."""

    exit_code = EXIT_USAGE


class UnknownLevelError(TractoscaleError):
    exit_code = EXIT_UNKNOWN_LEVEL


class ValidationError(TractoscaleError):
    """The input dataset failed BIDS validation."""

    exit_code = EXIT_VALIDATION


class NoMatchError(TractoscaleError):
    """Labels or filters selected no data."""

    exit_code = EXIT_NO_MATCH


class InputDataError(TractoscaleError):
    """Input files exist but their content is unusable (shape, gradients, NaNs...)."""

    exit_code = EXIT_DATA


class NoInputError(TractoscaleError):
    """A required input is missing."""

    exit_code = EXIT_NO_INPUT


class OutputError(TractoscaleError):
    """The output location cannot be created or written."""

    exit_code = EXIT_CANT_CREATE


class IOFailure(TractoscaleError):
    exit_code = EXIT_IO


# errors that only writing can cause: whatever the path, they are about the output side
_WRITE_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, name)}


def describe_os_error(exc: OSError, *output_roots) -> TractoscaleError:
    """A one-line error for a file system fault: exit 73 (cannot create output) when it concerns a
    path under one of ``output_roots`` or is a write-only error (disk full, quota, read-only file
    system, file too large), else exit 74 (I/O error, e.g. an unreadable input)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    path = exc.filename
    if path is not None:
        where = Path(os.path.abspath(os.fsdecode(path)))
        roots = [Path(os.path.abspath(r)) for r in output_roots if r is not None]
        if exc.errno in _WRITE_ERRNOS or any(where == r or r in where.parents for r in roots):
            return OutputError(f"cannot write {where}: {reason}")
        return IOFailure(f"cannot read {where}: {reason}")
    if exc.errno in _WRITE_ERRNOS:
        return OutputError(f"cannot write outputs: {reason}")
    return IOFailure(f"I/O error: {reason}")
