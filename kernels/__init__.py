"""Numba kernels (CPU and CUDA) used by tractoscale, and a Python tracking API.

``from kernels import track``: see :mod:`kernels.api`.  This package never imports the
application (``bids_app``); its errors (:mod:`kernels.errors`) name parameters, not flags.
"""


def __getattr__(name):   # lazy: importing kernels.tfce must not import dipy and the trackers
    if name in ("track", "TrackingRun"):
        from . import api
        return getattr(api, name)
    if name in ("track_learned", "LearnedTrackingRun"):
        from .learned import api as learned_api
        return getattr(learned_api, name)
    if name == "TrackParams":
        from .engine import TrackParams
        return TrackParams
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = ["track", "TrackingRun", "TrackParams", "track_learned", "LearnedTrackingRun"]
