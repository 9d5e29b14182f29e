"""User-facing errors and the exit codes of the BIDS execution spec (draft).

Anything a user can cause (bad arguments, bad data, missing inputs) raises a
:class:`TractoscaleError` subclass; the CLI prints its message on one line and
exits with its ``exit_code``.  Anything else is a bug and keeps its traceback.
"""

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
