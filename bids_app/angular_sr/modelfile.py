"""Angular super-resolution model files: PyTorch checkpoints in the published PCCNN layout.

Three kinds load (all with ``torch.load(weights_only=True)``: tensors and plain containers only, no
code from the file is ever executed):

* a published weight file of ``dmri-pcconv`` (``pccnn_weights.pt``, ``pccnn-bv_weights.pt``): a bare
  state dict whose keys start with ``pccnn.``; the published layer sizes, shells 1000/2000/3000
  s/mm^2, patches of 10x10x10 voxels, 10 output points per pass;
* a PyTorch Lightning checkpoint (``.ckpt``) of the same models: the state dict under ``state_dict``;
* a model written by ``tractoscale train-angular-sr``: the same layout plus a ``tractoscale`` entry
  with the layer sizes, the shells it was trained on, its patch size and where its data came from.

The variants with a mean spatial encoding (PCCNN-Sp, PCCNN-Bv-Sp) are recognised and refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "tractoscale-angular-sr"
FORMAT_VERSION = 1
PUBLISHED_SHELLS = (1000.0, 2000.0, 3000.0)
SHELL_TOLERANCE = 30.0        # s/mm^2: a data shell matches a model shell this close (as dmri-pcconv)


class ModelFileError(Exception):
    """The file cannot be used as an angular super-resolution model."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


class ShellError(Exception):
    """The data's shells are not the model's."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    variant: str                  # "pccnn" or "pccnn-bv"
    source: str                   # "published", "lightning" or "tractoscale"
    shells: tuple                 # s/mm^2
    patch: int                    # voxels per side of a prediction patch
    q_out: int                    # output points per pass (as trained)
    percentile: float             # per-shell intensity scale: this percentile in the brain mask
    hyper: object                 # nets.Hyper
    training: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"File": self.path.name, "SHA256": self.sha256, "Architecture": self.variant.upper(),
                "Source": self.source, "Shells": list(self.shells), "PatchSize": self.patch,
                "OutputPointsPerPass": self.q_out, "Parameters": self.n_parameters,
                **({"Training": self.training} if self.training else {})}

    @property
    def n_parameters(self) -> int:
        return int(self.training.get("Parameters", 0)) if self.training else 0

    def match_shells(self, bvals, b0_threshold: float = 50.0) -> tuple:
        """The model shell of each diffusion-weighted shell of ``bvals``; ShellError if one has none."""
        import numpy as np
        b = np.asarray(bvals, dtype=float)
        dw = b[b > b0_threshold]
        if dw.size == 0:
            raise ShellError("no diffusion-weighted volumes")
        bad = sorted({int(round(x)) for x in dw if min(abs(x - s) for s in self.shells) > SHELL_TOLERANCE})
        if bad:
            raise ShellError(f"b-value(s) {', '.join(map(str, bad))} are not among the model's shells "
                             f"({', '.join(str(int(s)) for s in self.shells)} s/mm^2, +-{SHELL_TOLERANCE:g})")
        return tuple(sorted({min(self.shells, key=lambda s: abs(s - x)) for x in dw}))


PUBLISHED_VARIANTS = {150: "pccnn", 180: "pccnn-bv", 240: "pccnn-sp", 270: "pccnn-bv-sp"}


def _variant(state: dict, path, meta: dict | None) -> str:
    """The variant from the first weight net's input size (ndims x 2 x Fourier degree 15 in the
    published files: 5 coordinates for PCCNN, 6 for -Bv, 8 and 9 with the spatial encoding)."""
    key = "pccnn.pcconv_in.weight_net.layers.0.weight"
    if key not in state:
        raise ModelFileError(path, "not a PCCNN checkpoint (no pccnn.pcconv_in weight net)")
    if meta:
        return "pccnn-bv" if dict(meta.get("hyper", {})).get("bval_mode") == "both" else "pccnn"
    variant = PUBLISHED_VARIANTS.get(int(state[key].shape[1]))
    if variant is None:
        raise ModelFileError(path, f"unrecognised PCCNN variant ({int(state[key].shape[1])} weight-net inputs)")
    if variant.endswith("-sp"):
        raise ModelFileError(path, f"{variant.upper()} (mean spatial encoding) models are not supported; "
                                   "use the PCCNN or PCCNN-Bv weights")
    return variant


def load_model(path, device="cpu"):
    """``(module, ModelInfo)``: the network in eval mode on ``device``; ModelFileError if unusable."""
    import torch

    from .nets import Hyper, PCCNNModule
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(path, "does not exist") from None
    except Exception as exc:      # pickle, zip and unsupported-type errors all mean the same here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(path, f"not a readable PyTorch checkpoint ({first[:160]})") from None
    if not isinstance(obj, dict):
        raise ModelFileError(path, f"not a checkpoint (a {type(obj).__name__}, expected a dict of tensors)")
    meta = obj.get("tractoscale") if isinstance(obj.get("tractoscale"), dict) else None
    if "state_dict" in obj:
        state, source = obj["state_dict"], "tractoscale" if meta else "lightning"
    else:
        state, source = obj, "published"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(path, "its state dict holds something other than tensors")
    variant = _variant(state, path, meta)
    try:
        if meta:
            if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
                raise ModelFileError(path, f"unknown format {meta.get('format')!r} version {meta.get('version')}")
            hyper = Hyper.from_dict(meta["hyper"])
            shells = tuple(float(s) for s in meta["shells"])
            patch, q_out, pcent = int(meta["patch"]), int(meta["q_out"]), float(meta.get("percentile", 99))
            training = dict(meta.get("training", {}))
        else:
            hyper = Hyper(bval_mode="both" if variant == "pccnn-bv" else "diff")
            shells, patch, q_out, pcent, training = PUBLISHED_SHELLS, 10, 10, 99.0, {}
        module = PCCNNModule(hyper)
        module.load_state_dict(state, strict=True)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelFileError(path, f"the weights do not fit the recorded architecture ({first[:200]})") from None
    if not shells or patch < 1 or q_out < 1:
        raise ModelFileError(path, "bad shells, patch size or output count in its header")
    from kernels.learned.modelfile import file_sha256
    training["Parameters"] = sum(p.numel() for p in module.parameters())
    info = ModelInfo(path=path, sha256=file_sha256(path), variant=variant, source=source, shells=shells,
                     patch=patch, q_out=q_out, percentile=pcent, hyper=hyper, training=training)
    return module.to(device).eval(), info


def save_model(path, module, *, shells, patch: int, q_out: int, percentile: float = 99.0,
               training: dict | None = None) -> Path:
    """Write a trained network in the published layout plus tractoscale's header (atomically)."""
    import os

    import torch
    path = Path(path)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "hyper": module.pccnn.hyper.to_dict(),
            "shells": [float(s) for s in shells], "patch": int(patch), "q_out": int(q_out),
            "percentile": float(percentile), "training": dict(training or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"state_dict": state, "tractoscale": meta}, str(tmp))
    os.replace(tmp, path)
    return path
