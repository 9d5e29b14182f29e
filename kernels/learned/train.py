"""Training a learned tracker on reference streamlines (PyTorch).

Each training subject is the signal's SH coefficients (:func:`~.signal.signal_sh`), its affine and
reference streamlines in world mm (a tractogram, or the ground truth of a phantom).  Streamlines are
resampled to the model's step and used in both directions; a held-out fraction of them (whole
streamlines, drawn with the seed) measures the validation loss after every epoch.  At each token the
network is taught the direction to the next point (the head's loss) and whether the streamline ends
there (binary cross-entropy).

Tracking starts from seeds inside bundles, with no history; so that the network learns to start
there too, half of the training sequences begin at a random point of their streamline, and the
first step of every sequence is taught in one canonical orientation (:data:`FIRST_STEP_AXIS`).  The points
at which the signal is read are jittered (``position_noise_mm``) and the previous direction is
perturbed (``direction_noise_deg``), so the network does not rely on being exactly on a reference
path.  Everything random is drawn from generators keyed on (seed, epoch): the same seed gives the
same model, and a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, ModelFileError, ParameterError
from .modelfile import CHECKPOINT_FORMAT, Architecture, InputSpec, describe, read_metadata, write_tensors
from .nets import build_network
from .sampling import SignalFeatures

log = logging.getLogger(__name__)

# A sequence's first token has no history: both orientations of the local fibre axis are equally
# right, and a unimodal head (von Mises-Fisher) cannot learn both.  Its target is the orientation
# with a positive component along this fixed, generic axis; tracking goes that way first, then the
# other way from the seed.
FIRST_STEP_AXIS = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (``max_epochs`` epochs at most; stop after ``patience`` epochs without
    a better validation loss and keep the best epoch's weights)."""

    max_epochs: int = 40
    patience: int = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    position_noise_mm: float = 0.3
    direction_noise_deg: float = 5.0
    crop_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        checks = (("max_epochs", self.max_epochs >= 1, "must be >= 1"),
                  ("patience", self.patience >= 1, "must be >= 1"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("learning_rate", 0 < self.learning_rate < 1, "must be in (0, 1)"),
                  ("validation_fraction", 0 <= self.validation_fraction < 1, "must be in [0, 1)"),
                  ("position_noise_mm", self.position_noise_mm >= 0, "must be >= 0"),
                  ("direction_noise_deg", 0 <= self.direction_noise_deg < 90, "must be in [0, 90)"),
                  ("crop_fraction", 0 <= self.crop_fraction <= 1, "must be in [0, 1]"),
                  ("seed", self.seed >= 0, "must be >= 0"))
        for name, ok, problem in checks:
            if not ok:
                raise ParameterError(name, f"{problem} (got {getattr(self, name)!r})")


@dataclass
class TrainingSubject:
    """One subject: signal coefficients (X, Y, Z, K) in world axes, affine, reference streamlines."""

    signal: np.ndarray
    affine: np.ndarray
    streamlines: list
    name: str = ""


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list = field(default_factory=list)     # one dict per epoch
    best_epoch: int = 0
    best_loss: float = math.inf
    stopped_early: bool = False
    n_train: int = 0                                 # sequences (streamline x direction)
    n_validation: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0                         # this process's CPU time (all threads)

    def summary(self) -> dict:
        return {"Epochs": len(self.history), "BestEpoch": self.best_epoch,
                "ValidationLoss": round(self.best_loss, 5), "StoppedEarly": self.stopped_early,
                "TrainingSequences": self.n_train, "ValidationSequences": self.n_validation,
                "Seconds": round(self.seconds, 1), "CPUSeconds": round(self.cpu_seconds, 1),
                "PyTorch": torch.__version__}


def resample(streamline, step: float) -> np.ndarray | None:
    """Points every ``step`` mm along a polyline (None when shorter than two steps)."""
    s = np.asarray(streamline, dtype=np.float64)
    if len(s) < 2:
        return None
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(s, axis=0), axis=1))])
    n = int(math.floor(arc[-1] / step + 1e-9)) + 1
    if n < 3:
        return None
    t = np.arange(n) * step
    return np.stack([np.interp(t, arc, s[:, k]) for k in range(3)], axis=1)


class _Sequences:
    """Resampled streamlines of every subject, both directions, split into train and validation."""

    def __init__(self, subjects, spec: InputSpec, settings: TrainSettings, device):
        self.features = [SignalFeatures(s.signal, s.affine, spec, device) for s in subjects]
        items = []                       # (subject, streamline number, points)
        for si, sub in enumerate(subjects):
            for li, sl in enumerate(sub.streamlines):
                pts = resample(sl, spec.step_mm)
                if pts is not None:
                    items.append((si, li, pts))
        if len(items) < 2:
            raise DataError("fewer than two reference streamlines are at least two steps long")
        rng = np.random.default_rng([settings.seed, 7])
        n_val = int(round(settings.validation_fraction * len(items)))
        if settings.validation_fraction > 0:
            n_val = max(1, min(n_val, len(items) - 1))
        val = set(rng.permutation(len(items))[:n_val].tolist())
        both = [(si, p) for si, _, p in items] + [(si, p[::-1].copy()) for si, _, p in items]
        n = len(items)
        self.train = [both[i] for i in range(2 * n) if i % n not in val]
        self.val = [both[i] for i in range(2 * n) if i % n in val]
        self.device = device
        self.signature = _signature(subjects, spec)

    def standardisation(self):
        """Mean and standard deviation of the features at the training points."""
        feats = torch.cat([self.features[si](torch.as_tensor(p, dtype=torch.float32, device=self.device))
                           for si, p in self.train])
        return feats.mean(0), feats.std(0)

    def batch(self, seqs, rng: np.random.Generator | None, settings: TrainSettings):
        """Padded tensors of a batch: features, previous directions, targets, masks."""
        if rng is not None:
            crops = []
            for si, p in seqs:
                if rng.random() < settings.crop_fraction and len(p) > 3:
                    p = p[int(rng.integers(1, len(p) - 2)):]
                crops.append((si, p))
            seqs = crops
        b, t = len(seqs), max(len(p) for _, p in seqs)
        n_feat = self.features[0].offsets.shape[0] * self.features[0].sampler.channels
        prev = np.zeros((b, t, 3), np.float32)
        target = np.zeros((b, t, 3), np.float32)
        dir_mask = np.zeros((b, t), bool)
        tok_mask = np.zeros((b, t), bool)
        eos = np.zeros((b, t), np.float32)
        where = {}                       # subject -> (flat token slots, points to read the signal at)
        for i, (si, p) in enumerate(seqs):
            n = len(p)
            d = np.diff(p, axis=0)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            at, pv = p, d
            if rng is not None:
                if settings.position_noise_mm:
                    at = p + rng.normal(0.0, settings.position_noise_mm, p.shape)
                if settings.direction_noise_deg:
                    pv = d + rng.normal(0.0, math.radians(settings.direction_noise_deg), d.shape)
                    pv /= np.linalg.norm(pv, axis=1, keepdims=True)
            slots, pts = where.setdefault(si, ([], []))
            slots.append(i * t + np.arange(n))
            pts.append(at)
            prev[i, 1:n] = pv
            target[i, :n - 1] = d
            if d[0] @ FIRST_STEP_AXIS < 0:      # no history: the axis, oriented canonically
                target[i, 0] = -d[0]
            dir_mask[i, :n - 1] = True
            tok_mask[i, :n] = True
            eos[i, n - 1] = 1.0
        feat = torch.zeros(b * t, n_feat, device=self.device)
        for si, (slots, pts) in where.items():
            idx = torch.as_tensor(np.concatenate(slots), device=self.device)
            feat[idx] = self.features[si](torch.as_tensor(np.concatenate(pts), dtype=torch.float32,
                                                          device=self.device))
        def dev(x):
            return torch.as_tensor(x, device=self.device)
        return (feat.reshape(b, t, n_feat), dev(prev), dev(target), dev(dir_mask), dev(tok_mask), dev(eos))


def _signature(subjects, spec: InputSpec) -> str:
    """A hash of the training data and input specification (a checkpoint resumes only on the same)."""
    h = hashlib.sha256(json.dumps(asdict(spec)).encode())
    for s in subjects:
        h.update(np.ascontiguousarray(s.signal, dtype=np.float32).tobytes())
        h.update(np.asarray(s.affine, dtype=np.float64).tobytes())
        for sl in s.streamlines:
            h.update(np.ascontiguousarray(sl, dtype=np.float32).tobytes())
    return h.hexdigest()


def _loss(model, batch):
    feat, prev, target, dir_mask, tok_mask, eos = batch
    out, eos_logit = model(feat, prev)
    dir_loss = model.head.loss(out[dir_mask], target[dir_mask]).sum()
    eos_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        eos_logit[tok_mask], eos[tok_mask], reduction="sum")
    return dir_loss + eos_loss, int(tok_mask.sum())


# ----------------------------------------------------------------------------- checkpoints
def _checkpoint_meta(spec, arch, settings, signature, **state) -> str:
    return describe(spec, arch, {}, fmt=CHECKPOINT_FORMAT, settings=asdict(settings), data=signature, **state)


def _save_checkpoint(path, model, best_state, optimiser, meta: str) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt = optimiser.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    write_tensors(path, tensors, meta)


def _load_checkpoint(path, model, optimiser, spec, arch, settings, signature):
    from safetensors.torch import load_file

    desc, _ = read_metadata(path, expected_format=CHECKPOINT_FORMAT)
    mine = json.loads(_checkpoint_meta(spec, arch, settings, signature))
    for d in (desc, mine):     # a resumed run may go on longer or be more patient: same trajectory
        for name in ("max_epochs", "patience"):
            (d.get("settings") or {}).pop(name, None)
    for key, what in (("inputs", "input specification"), ("architecture", "architecture"),
                      ("settings", "training settings"), ("data", "training data")):
        if desc.get(key) != mine[key]:
            raise ParameterError("resume", f"{path} was made with another {what}; start afresh or use "
                                           "the same settings and data")
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt = optimiser.state_dict()
    state = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt["state"] = state
    optimiser.load_state_dict(opt)
    return desc, best


# ----------------------------------------------------------------------------- training
def train_tracker(subjects: list[TrainingSubject], *, inputs: InputSpec = InputSpec(),
                  architecture: Architecture = Architecture(), settings: TrainSettings = TrainSettings(),
                  device: str = "cpu", checkpoint=None, resume: bool = False,
                  progress: bool = False) -> TrainResult:
    """Train a network; returns it (best validation epoch's weights, eval mode) and its history.

    ``checkpoint``: a file written after every epoch (weights, optimiser, best weights, history);
    with ``resume`` training continues from it (same data and settings required).
    """
    from tqdm import tqdm

    if not subjects:
        raise ParameterError("subjects", "must hold at least one training subject")
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(settings.seed)
    device = torch.device(device)
    data = _Sequences(subjects, inputs, settings, device)
    model = build_network(inputs, architecture).to(device)
    mean, std = data.standardisation()
    model.embed.set_standardisation(mean, std)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history, best_loss, best_epoch, bad, start = [], math.inf, 0, 0, 1
    if resume:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise ParameterError("resume", f"needs an existing checkpoint (got {checkpoint})")
        try:
            desc, best_state = _load_checkpoint(checkpoint, model, optimiser, inputs, architecture, settings,
                                                data.signature)
        except ModelFileError as exc:
            raise ParameterError("resume", f"cannot read the checkpoint: {exc.problem}") from None
        history, best_loss, best_epoch, bad = (desc["history"], desc["best_loss"], desc["best_epoch"],
                                               desc["bad_epochs"])
        start = len(history) + 1
        log.info("resuming after epoch %d (best validation loss %.4f at epoch %d)", start - 1, best_loss, best_epoch)
    stopped = bad >= settings.patience
    epochs = range(start, settings.max_epochs + 1) if not stopped else range(0)
    bar = tqdm(epochs, desc="training", unit="epoch", disable=None if progress else True)
    for epoch in bar:
        rng = np.random.default_rng([settings.seed, epoch])
        torch.manual_seed(settings.seed * 100003 + epoch)
        te = time.perf_counter()
        model.train()
        order = rng.permutation(len(data.train))
        total, tokens = 0.0, 0
        for i in range(0, len(order), settings.batch_size):
            batch = data.batch([data.train[j] for j in order[i:i + settings.batch_size]], rng, settings)
            loss, n = _loss(model, batch)
            optimiser.zero_grad()
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            total, tokens = total + float(loss.detach()), tokens + n
        train_loss = total / max(tokens, 1)
        val_loss = _evaluate(model, data, settings) if data.val else train_loss
        history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "validation_loss": round(val_loss, 6),
                        "seconds": round(time.perf_counter() - te, 3)})
        if not math.isfinite(best_loss) or val_loss < best_loss - 1e-4 * abs(best_loss):
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=best_epoch)
        if checkpoint is not None:
            _save_checkpoint(checkpoint, model, best_state, optimiser, _checkpoint_meta(
                inputs, architecture, settings, data.signature, history=history, best_loss=best_loss,
                best_epoch=best_epoch, bad_epochs=bad))
        if bad >= settings.patience:
            stopped = True
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=best_epoch, best_loss=best_loss,
                       stopped_early=stopped, n_train=len(data.train), n_validation=len(data.val),
                       seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


@torch.no_grad()
def _evaluate(model, data: _Sequences, settings: TrainSettings) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(data.val), 4 * settings.batch_size):
        loss, n = _loss(model, data.batch(data.val[i:i + 4 * settings.batch_size], None, settings))
        total, tokens = total + float(loss), tokens + n
    return total / max(tokens, 1)
