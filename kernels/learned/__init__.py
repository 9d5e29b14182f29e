"""Learned tractography: recurrent and transformer trackers trained on reference streamlines.

Needs PyTorch and safetensors (``pip install "tractoscale[learn]"``); importing this package does
not import them, so :mod:`.modelfile` (reading and checking a model file's header) and
:mod:`.signal` (the input signal) work without PyTorch.

* :func:`train_tracker` (:mod:`.train`): reference streamlines + the signal -> a network;
  :func:`~.modelfile.save_model` writes it as one self-describing safetensors file.
* :func:`track_learned` / :class:`LearnedTrackingRun` (:mod:`.api`): track with a model file.
* :mod:`.nets`: the networks (GRU, transformer) and heads (sphere classification, von Mises-Fisher).
"""

_LAZY = {"track_learned": "api", "LearnedTrackingRun": "api", "torch_device": "api",
         "train_tracker": "train", "TrainSettings": "train", "TrainingSubject": "train",
         "load_model": "modelfile", "save_model": "modelfile", "read_info": "modelfile",
         "InputSpec": "modelfile", "Architecture": "modelfile", "LearnedParams": "tracker",
         "signal_sh": "signal"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'kernels.learned' has no attribute {name!r}")


def missing_dependencies() -> list[str]:
    """The packages of the ``learn`` extra that are not installed (without importing them)."""
    import importlib.util
    return [m for m in ("torch", "safetensors") if importlib.util.find_spec(m) is None]


__all__ = sorted(_LAZY) + ["missing_dependencies"]
