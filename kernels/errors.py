"""Errors of the kernels library: neutral words, no command-line flags.

Applications map them to their own vocabulary (the tractoscale CLI turns a
:class:`ParameterError` for ``step_size`` into a usage error naming ``--step-size``).
"""
from __future__ import annotations


class ParameterError(ValueError):
    """A parameter value is out of range or inconsistent; ``name`` is the parameter's name."""

    def __init__(self, name: str, problem: str):
        self.name = name
        self.problem = problem
        super().__init__(f"{name} {problem}")


class DeviceError(RuntimeError):
    """The requested compute device cannot be used."""


class DataError(ValueError):
    """The data cannot serve the request (e.g. too few gradient directions for a model's SH order)."""


class ModelFileError(ValueError):
    """A learned-tracker model file is unreadable, truncated or not a tractoscale model.
    ``path`` is the file, ``problem`` what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
