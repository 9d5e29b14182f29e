"""Tracking parameters: names, defaults and valid ranges, written once.

A light module (no numpy, no numba): the tractoscale command line reads its tracking defaults and
checks from here before anything heavy is imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ParameterError

ALGORITHMS = ("prob", "det", "ptt", "boot")
ALGORITHM_NAMES = {"prob": "probabilistic", "det": "deterministic (closest peak)",
                   "ptt": "parallel transport tractography", "boot": "residual bootstrap"}
STOP_METHODS = ("threshold", "act", "cmc")


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ParameterError(name, problem)


@dataclass(frozen=True)
class TrackParams:
    """Tracking settings; lengths in mm, angles in degrees.  Checked when created
    (:class:`~kernels.errors.ParameterError` names the field)."""

    algorithm: str = "prob"                 # prob | det | ptt | boot (residual bootstrap)
    step_size: float = 0.5                  # mm
    max_angle: float = 30.0                 # degrees between successive steps
    pmf_threshold: float = 0.1              # ODF values below this fraction of the maximum are ignored
    stop_method: str = "threshold"          # threshold (a scalar map) | act | cmc (include/exclude maps)
    stop_threshold: float = 0.1             # threshold stopping: track while the map is above this
    rel_peak_threshold: float = 0.25        # seed peaks below this fraction of the ODF maximum are ignored
    min_separation_angle: float = 45.0      # degrees between two seed peaks
    min_length: float = 10.0                # mm; shorter streamlines are discarded
    max_length: float = 250.0               # mm; tracking stops there
    max_cross: int = 1                      # streamlines per seed: one per ODF peak, up to this
    rng_seed: int = 0                       # same seed, same streamlines on every device
    ptt_probe_length: float | None = None   # PTT probe length (mm); default: the smallest voxel size
    ptt_probe_points: int = 4
    ptt_max_tries: int = 50
    boot_max_tries: int = 5

    def __post_init__(self):
        finite = math.isfinite
        _check("algorithm", self.algorithm in ALGORITHMS, f"must be one of {', '.join(ALGORITHMS)}")
        _check("step_size", self.step_size > 0 and finite(self.step_size),
               f"must be a positive number of mm (got {self.step_size})")
        _check("max_angle", 0 < self.max_angle <= 90, f"must be in (0, 90] degrees (got {self.max_angle})")
        _check("min_length", self.min_length >= 0 and finite(self.min_length),
               f"must be >= 0 mm (got {self.min_length})")
        _check("max_length", self.max_length > 0 and finite(self.max_length),
               f"must be > 0 mm (got {self.max_length})")
        _check("min_length", self.min_length <= self.max_length,
               f"({self.min_length}) is larger than max_length ({self.max_length})")
        _check("step_size", self.step_size <= self.max_length, "is larger than max_length")
        _check("pmf_threshold", 0 <= self.pmf_threshold < 1, f"must be in [0, 1) (got {self.pmf_threshold})")
        _check("stop_method", self.stop_method in STOP_METHODS, f"must be one of {', '.join(STOP_METHODS)}")
        _check("rel_peak_threshold", 0 <= self.rel_peak_threshold < 1,
               f"must be in [0, 1) (got {self.rel_peak_threshold})")
        _check("min_separation_angle", 0 < self.min_separation_angle <= 90,
               f"must be in (0, 90] degrees (got {self.min_separation_angle})")
        _check("max_cross", 1 <= self.max_cross <= 8, f"must be between 1 and 8 (got {self.max_cross})")
        _check("rng_seed", self.rng_seed >= 0, f"must be >= 0 (got {self.rng_seed})")
        _check("ptt_probe_length", self.ptt_probe_length is None or self.ptt_probe_length > 0,
               f"must be > 0 mm (got {self.ptt_probe_length})")
        for name in ("ptt_probe_points", "ptt_max_tries", "boot_max_tries"):
            _check(name, getattr(self, name) >= 1, f"must be >= 1 (got {getattr(self, name)})")

    @property
    def max_points(self) -> int:
        return max_points(self.max_length, self.step_size)

    @property
    def min_points(self) -> int:
        return min_points(self.min_length, self.step_size)


def max_points(max_length: float, step_size: float) -> int:
    """Points of a streamline of ``max_length`` mm (the seed included) at ``step_size`` mm per step."""
    return int(math.floor(max_length / step_size + 1e-9)) + 1


def min_points(min_length: float, step_size: float) -> int:
    """The fewest points a streamline of at least ``min_length`` mm has (two at least)."""
    return max(2, int(math.ceil(min_length / step_size - 1e-9)) + 1)



__all__ = ["TrackParams", "ALGORITHMS", "ALGORITHM_NAMES", "STOP_METHODS"]
