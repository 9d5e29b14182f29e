"""The learned tracker's model file: one self-describing safetensors file.

The file holds the network's tensors and, in the safetensors header's metadata, one JSON document
(key ``tractoscale``) describing everything needed to use it: the architecture, the input
specification (SH order, shell, neighbourhood, step) and where the training data came from.
Loading never executes code from the file: safetensors stores raw tensors and a JSON header, no
pickle.  :func:`read_info` reads and checks the header without PyTorch (fast: the command line uses
it before any work); :func:`load_model` builds the network and loads its weights with PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, ParameterError
from ..frames import n_coefficients

FORMAT = "tractoscale-tracker"
CHECKPOINT_FORMAT = "tractoscale-tracker-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "tractoscale"
MODEL_KINDS = ("gru", "transformer")
HEADS = ("sphere", "vmf")
MODEL_NAMES = {"gru": "recurrent (stacked GRU, Learn2track-like)",
               "transformer": "transformer (causal attention over the streamline so far)"}
HEAD_NAMES = {"sphere": "sphere classification (softmax over sphere directions)",
              "vmf": "von Mises-Fisher (continuous direction and concentration)"}


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ParameterError(name, problem)


@dataclass(frozen=True)
class InputSpec:
    """What the network reads at each point: S/S0 of one shell as SH coefficients of order
    ``sh_order`` in world axes (``tournier07``, ``legacy=False``), trilinearly interpolated at the
    point and at its 6 neighbours ``neighbourhood_mm`` away along the world axes, plus the previous
    step's direction.  Streamlines advance by ``step_mm``."""

    sh_order: int = 6
    shell: float = 1000.0            # s/mm^2
    neighbourhood_mm: float = 2.0    # 0: the point only
    step_mm: float = 1.0

    def __post_init__(self):
        _check("sh_order", isinstance(self.sh_order, int) and 2 <= self.sh_order <= 12 and self.sh_order % 2 == 0,
               f"must be an even number between 2 and 12 (got {self.sh_order})")
        _check("shell", self.shell > 50, f"must be a b-value > 50 s/mm^2 (got {self.shell})")
        _check("neighbourhood_mm", 0 <= self.neighbourhood_mm <= 20,
               f"must be in [0, 20] mm (got {self.neighbourhood_mm})")
        _check("step_mm", 0 < self.step_mm <= 10, f"must be in (0, 10] mm (got {self.step_mm})")

    @property
    def n_coefficients(self) -> int:
        return n_coefficients(self.sh_order)

    @property
    def offsets(self) -> np.ndarray:
        """(M, 3) world-mm offsets of the sampled points: the point, then +-x, +-y, +-z."""
        if self.neighbourhood_mm == 0:
            return np.zeros((1, 3))
        r = self.neighbourhood_mm
        return np.vstack([np.zeros((1, 3)), r * np.eye(3), -r * np.eye(3)])[[0, 1, 4, 2, 5, 3, 6]]

    @property
    def n_features(self) -> int:
        return self.n_coefficients * len(self.offsets)


@dataclass(frozen=True)
class Architecture:
    """The network: ``kind`` gru (stacked GRU) or transformer (causal self-attention), ``head``
    sphere (classification over ``sphere``'s directions) or vmf (von Mises-Fisher), ``hidden``
    units, ``layers`` recurrent or attention layers, ``heads`` attention heads (transformer)."""

    kind: str = "gru"
    head: str = "sphere"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    sphere: str = "repulsion724"

    def __post_init__(self):
        _check("kind", self.kind in MODEL_KINDS, f"must be one of {', '.join(MODEL_KINDS)} (got {self.kind!r})")
        _check("head", self.head in HEADS, f"must be one of {', '.join(HEADS)} (got {self.head!r})")
        _check("hidden", isinstance(self.hidden, int) and 8 <= self.hidden <= 4096,
               f"must be between 8 and 4096 (got {self.hidden})")
        _check("layers", isinstance(self.layers, int) and 1 <= self.layers <= 16,
               f"must be between 1 and 16 (got {self.layers})")
        _check("heads", isinstance(self.heads, int) and self.heads >= 1 and self.hidden % self.heads == 0,
               f"must divide hidden ({self.hidden}) (got {self.heads})")

    @property
    def description(self) -> str:
        return f"{MODEL_NAMES[self.kind]}, {HEAD_NAMES[self.head]}"


@dataclass(frozen=True)
class ModelInfo:
    """A model file's header: checked, without the weights."""

    path: Path
    inputs: InputSpec
    architecture: Architecture
    training: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)     # name -> shape
    sha256: str = ""

    def describe(self) -> dict:
        """JSON-able description (for sidecars)."""
        return {"File": self.path.name, "SHA256": self.sha256,
                "Architecture": {"Description": self.architecture.description, **asdict(self.architecture)},
                "Inputs": {**asdict(self.inputs), "Signal": "S/S0 of one shell, SH (tournier07, legacy=False), "
                                                            "world (RAS+) axes, trilinear interpolation"},
                "Training": self.training}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _from_dict(cls, d, path, what):
    if not isinstance(d, dict):
        raise ModelFileError(path, f"the header's {what} is not a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ModelFileError(path, f"unknown {what} fields {unknown} (a newer tractoscale's model?)")
    try:
        return cls(**d)
    except (ParameterError, TypeError) as exc:
        raise ModelFileError(path, f"bad {what}: {exc}") from None


def read_metadata(path, expected_format: str = FORMAT) -> tuple[dict, dict]:
    """(the JSON description, {tensor name: shape}) of a model or checkpoint file, checked for
    truncation and format; raises :class:`ModelFileError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(path, f"not a readable model file (safetensors: {exc})") from None
    if METADATA_KEY not in meta:
        raise ModelFileError(path, "a safetensors file, but not a tractoscale tracker model (no 'tractoscale' "
                                   "description in its header)")
    try:
        desc = json.loads(meta[METADATA_KEY])
    except ValueError:
        raise ModelFileError(path, "the header's description is not valid JSON") from None
    if not isinstance(desc, dict) or desc.get("format") != expected_format:
        got = desc.get("format") if isinstance(desc, dict) else None
        raise ModelFileError(path, f"format {got!r}, expected {expected_format!r}")
    if desc.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(path, f"format version {desc.get('format_version')!r}; this tractoscale reads "
                                   f"version {FORMAT_VERSION}")
    return desc, shapes


def read_info(path) -> ModelInfo:
    """The header of a model file, checked (format, version, fields, input size); no PyTorch."""
    path = Path(path)
    desc, shapes = read_metadata(path)
    inputs = _from_dict(InputSpec, desc.get("inputs"), path, "inputs")
    arch = _from_dict(Architecture, desc.get("architecture"), path, "architecture")
    expect = expected_shapes(inputs, arch)
    for name, shape in expect.items():
        if name not in shapes:
            raise ModelFileError(path, f"tensor {name!r} is missing")
        if shape is not None and tuple(shapes[name]) != shape:
            raise ModelFileError(path, f"tensor {name!r} has shape {tuple(shapes[name])}, the header's "
                                       f"architecture and inputs need {shape}")
    training = desc.get("training") or {}
    return ModelInfo(path=path, inputs=inputs, architecture=arch, training=training, tensors=shapes,
                     sha256=file_sha256(path))


def expected_shapes(inputs: InputSpec, arch: Architecture) -> dict:
    """Shapes of the tensors that tie the weights to the header (None: any shape)."""
    return {"embed.mean": (inputs.n_features,), "embed.scale": (inputs.n_features,),
            "embed.linear.weight": (arch.hidden, inputs.n_features + 3),
            "eos.weight": (1, arch.hidden)}


def describe(inputs: InputSpec, arch: Architecture, training: dict, fmt: str = FORMAT, **extra) -> str:
    return json.dumps({"format": fmt, "format_version": FORMAT_VERSION, "inputs": asdict(inputs),
                       "architecture": asdict(arch), "training": training, **extra})


def write_tensors(path, tensors: dict, metadata: str) -> Path:
    """Write ``tensors`` (name -> torch tensor) and the JSON ``metadata`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={METADATA_KEY: metadata})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_model(path, model, inputs: InputSpec, arch: Architecture, training: dict) -> Path:
    """Write a trained network and its description as one model file."""
    return write_tensors(path, model.state_dict(), describe(inputs, arch, training))


def load_model(path, device: str = "cpu"):
    """``(network, ModelInfo)``: the network in eval mode on ``device``; raises
    :class:`ModelFileError` when the file is not a usable model."""
    import torch
    from safetensors.torch import load_file

    from .nets import build_network

    info = read_info(path)
    model = build_network(info.inputs, info.architecture)
    try:
        state = load_file(str(info.path), device="cpu")
    except Exception as exc:   # safetensors raises its own error types
        raise ModelFileError(info.path, f"cannot read the weights ({exc})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelFileError(info.path, f"non-finite values in {bad[0]!r}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelFileError(info.path, "the weights do not match the header's architecture ("
                                        f"{first[1].strip() if len(first) > 1 else first[0]})") from None
    return model.to(device).eval(), info
