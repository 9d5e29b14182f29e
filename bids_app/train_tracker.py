"""``tractoscale train-tracker MODEL ...``: train a learned tracker and write its model file.

Training data are pairs of a DWI run (its ``.bval``/``.bvec`` beside it, BIDS naming) and a
reference tractogram in the same subject's world space (TRX, TCK or TRK): ``--pair DWI TRACTOGRAM``
(repeatable), or ``--from-demo BIDS_DIR`` for the demo dataset's subjects and their ground-truth
trajectories.  The model file (:mod:`kernels.learned.modelfile`) records the architecture, the input
specification and the provenance of the training data (file names and SHA-256 of every DWI and
tractogram); ``tractoscale ... participant --tracking learned --tracking-model MODEL`` uses it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from .errors import InputDataError, NoInputError, UsageError

log = logging.getLogger("tractoscale.train")

# library parameter -> option of this command
FLAGS = {"sh_order": "--sh-order", "shell": "--shell", "neighbourhood_mm": "--neighbourhood",
         "step_mm": "--step-size", "kind": "--model", "head": "--head", "hidden": "--hidden",
         "layers": "--layers", "heads": "--heads", "max_epochs": "--max-epochs", "patience": "--patience",
         "batch_size": "--batch-size", "learning_rate": "--learning-rate",
         "validation_fraction": "--validation", "seed": "--seed", "resume": "--resume",
         "device": "--device"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model file to write (.safetensors)")
    data = p.add_argument_group("training data")
    data.add_argument("--pair", nargs=2, action="append", metavar=("DWI", "TRACTOGRAM"), default=[],
                      help="a DWI run (.nii[.gz] with .bval/.bvec beside it) and a reference tractogram "
                           "(.trx, .tck or .trk) in its world space; repeat for more")
    data.add_argument("--from-demo", type=Path, metavar="BIDS_DIR",
                      help="a demo dataset ('tractoscale demo-data'): each subject's DWI with its ground-truth "
                           "trajectories (sourcedata/groundtruth)")
    data.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                      help="with --from-demo: the subjects to train on (default: all)")
    net = p.add_argument_group("model")
    net.add_argument("--model", dest="kind", default="gru", choices=("gru", "transformer"),
                     help="gru: stacked GRU (Learn2track-like); transformer: causal attention over the "
                          "streamline so far (default: gru)")
    net.add_argument("--head", default="sphere", choices=("sphere", "vmf"),
                     help="direction output: sphere classification or von Mises-Fisher (default: sphere)")
    net.add_argument("--hidden", type=int, default=128, metavar="N", help="hidden units (default: 128)")
    net.add_argument("--layers", type=int, default=2, metavar="N", help="GRU or attention layers (default: 2)")
    net.add_argument("--heads", type=int, default=4, metavar="N", help="attention heads (default: 4)")
    inp = p.add_argument_group("inputs")
    inp.add_argument("--sh-order", type=int, default=6, metavar="L",
                     help="SH order of the signal (default: 6; needs (L+1)(L+2)/2 directions on the shell)")
    inp.add_argument("--shell", type=float, metavar="B", help="b-value of the shell read (default: the lowest)")
    inp.add_argument("--neighbourhood", type=float, metavar="MM",
                     help="distance of the 6 neighbours read around each point (default: the smallest voxel size)")
    inp.add_argument("--step-size", type=float, metavar="MM",
                     help="step size in mm (default: half the smallest voxel size)")
    fit = p.add_argument_group("optimisation")
    fit.add_argument("--max-epochs", type=int, default=30, metavar="N", help="at most N epochs (default: 30)")
    fit.add_argument("--patience", type=int, default=5, metavar="N",
                     help="early stopping: stop after N epochs without a better validation loss (default: 5)")
    fit.add_argument("--batch-size", type=int, default=32, metavar="N", help="sequences per batch (default: 32)")
    fit.add_argument("--learning-rate", type=float, default=3e-3, metavar="F", help="Adam's (default: 0.003)")
    fit.add_argument("--validation", type=float, default=0.1, metavar="F",
                     help="fraction of the streamlines held out for validation (default: 0.1)")
    fit.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    fit.add_argument("--checkpoint", type=Path, metavar="FILE", help="write a checkpoint after every epoch")
    fit.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    run = p.add_argument_group("resources")
    run.add_argument("--nthreads", type=int, metavar="N", help="CPU threads (default: all available)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="PyTorch device: CUDA if a GPU is visible (auto) (default: auto)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- data
def demo_pairs(bids_dir: Path, labels) -> list[tuple[Path, Path]]:
    from .demo.dataset import is_demo_dataset
    if not is_demo_dataset(bids_dir):
        raise UsageError(f"--from-demo {bids_dir}: not a dataset written by 'tractoscale demo-data'")
    gt = bids_dir / "sourcedata" / "groundtruth"
    pairs = []
    for dwi in sorted(bids_dir.glob("sub-*/**/dwi/*_dwi.nii.gz")):
        sub = dwi.name.split("_")[0].removeprefix("sub-")
        if labels and sub not in labels:
            continue
        rel = dwi.parent.parent.relative_to(bids_dir)
        pairs.append((dwi, gt / rel / dwi.name.replace("_dwi.nii.gz", "_tractogram.trx")))
    found = {d.name.split("_")[0].removeprefix("sub-") for d, _ in pairs}
    missing = sorted(set(labels or ()) - found)
    if missing:
        raise UsageError(f"--participant-label: no such subject in {bids_dir}: {', '.join(missing)}")
    return pairs


def _gradient_files(dwi: Path) -> tuple[Path, Path]:
    stem = dwi.name.removesuffix(".gz").removesuffix(".nii")
    return dwi.with_name(stem + ".bval"), dwi.with_name(stem + ".bvec")


def load_streamlines(path: Path, reference: Path) -> list[np.ndarray]:
    """World-mm streamlines of a TRX, TCK or TRK file."""
    from dipy.io.streamline import load_tractogram
    if path.suffix.lower() not in (".trx", ".tck", ".trk"):
        raise UsageError(f"{path}: a reference tractogram must be .trx, .tck or .trk")
    try:
        sft = load_tractogram(str(path), str(reference) if path.suffix.lower() == ".tck" else "same",
                              bbox_valid_check=False)
        sft.to_rasmm()
        return [np.asarray(s, dtype=np.float64) for s in sft.streamlines]
    except Exception as exc:     # nibabel/trx raise many types for corrupt files
        raise InputDataError(f"{path.name}: cannot read the tractogram ({exc})") from None


def _digest(path: Path) -> str:
    from kernels.learned.modelfile import file_sha256
    return file_sha256(path)


def load_pair(dwi_path: Path, tract_path: Path, order: int, shell: float | None):
    """(TrainingSubject, provenance entry, voxel sizes, shell used)."""
    from kernels.learned.signal import pick_shell, shell_volumes, signal_sh
    from kernels.learned.train import TrainingSubject

    from .inputs import load_dwi
    from .learned import model_errors
    for f in (dwi_path, tract_path):
        if not Path(f).is_file():
            raise NoInputError(f"{f} does not exist")
    bval, bvec = _gradient_files(dwi_path)
    for f in (bval, bvec):
        if not f.is_file():
            raise NoInputError(f"{f} (the gradient table of {dwi_path.name}) does not exist")
    dwi = load_dwi(dwi_path, bval, bvec, mask="auto")     # the signal of the brain voxels
    mask = dwi.mask
    with model_errors(dwi_path.name):
        used = pick_shell(dwi.bvals, shell)
        signal = signal_sh(dwi.data, dwi.bvals, dwi.bvecs, dwi.affine, frame="voxel", sh_order=order,
                           shell=used, mask=mask)
    streamlines = load_streamlines(tract_path, dwi_path)
    if not streamlines:
        raise InputDataError(f"{tract_path.name}: no streamlines")
    pts = np.concatenate(streamlines)
    inv = np.linalg.inv(dwi.affine)
    ijk = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(mask.shape)), axis=1)
    inside = np.zeros(len(pts), bool)
    inside[ok] = mask[tuple(ijk[ok].T)]
    if inside.mean() < 0.5:
        raise InputDataError(f"{tract_path.name}: only {100 * inside.mean():.0f}% of its points lie in the brain "
                             f"mask of {dwi_path.name}; is it in that subject's world space?")
    entry = {"DWI": dwi_path.name, "DWISHA256": _digest(dwi_path), "Tractogram": tract_path.name,
             "TractogramSHA256": _digest(tract_path), "Streamlines": len(streamlines), "Shell": used,
             "Directions": int(shell_volumes(dwi.bvals, used).sum())}
    subject = TrainingSubject(signal=signal, affine=dwi.affine, streamlines=streamlines, name=dwi_path.name)
    return subject, entry, np.asarray(dwi.zooms, dtype=float), used


# ----------------------------------------------------------------------------- running
def _library_errors(exc) -> UsageError:
    return UsageError(f"{FLAGS.get(exc.name, exc.name)} {exc.problem}")


def run(args) -> int:
    from kernels.errors import DeviceError, ParameterError

    from .learned import model_errors, require_learn_extra, training_record
    require_learn_extra("train-tracker")
    pairs = [(Path(a), Path(b)) for a, b in args.pair]
    if args.from_demo is not None:
        labels = tuple(str(x).removeprefix("sub-") for x in args.participant_label or ())
        pairs += demo_pairs(Path(args.from_demo), labels)
    elif args.participant_label:
        raise UsageError("--participant-label goes with --from-demo")
    if not pairs:
        raise UsageError("no training data: give --pair DWI TRACTOGRAM or --from-demo BIDS_DIR")
    if args.resume and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint FILE")
    if args.nthreads is not None and args.nthreads < 1:
        raise UsageError(f"--nthreads must be >= 1 (got {args.nthreads})")
    from .derivatives import writable_parent
    out = writable_parent(args.model)

    from .learned import prepare_torch
    prepare_torch(args.nthreads)

    from kernels.learned.api import torch_device
    from kernels.learned.modelfile import Architecture, InputSpec, save_model
    from kernels.learned.train import TrainSettings, train_tracker

    try:
        arch = Architecture(kind=args.kind, head=args.head, hidden=args.hidden, layers=args.layers, heads=args.heads)
        settings = TrainSettings(max_epochs=args.max_epochs, patience=args.patience, batch_size=args.batch_size,
                                 learning_rate=args.learning_rate, validation_fraction=args.validation,
                                 seed=args.seed)
        InputSpec(sh_order=args.sh_order)      # check the order before the data are read
        device = torch_device(args.device)
    except ParameterError as exc:
        raise _library_errors(exc) from None
    except DeviceError as exc:
        raise UsageError(f"--device {args.device}: {exc}") from None

    subjects, entries, shell, zooms = [], [], args.shell, None
    for dwi, tract in pairs:
        log.info("reading %s and %s", dwi.name, tract.name)
        subject, entry, vs, shell = load_pair(dwi, tract, args.sh_order, shell)
        subjects.append(subject)
        entries.append(entry)
        zooms = vs if zooms is None else zooms
    try:
        spec = InputSpec(sh_order=args.sh_order, shell=float(shell),
                         neighbourhood_mm=float(args.neighbourhood if args.neighbourhood is not None else zooms.min()),
                         step_mm=float(args.step_size if args.step_size is not None else 0.5 * zooms.min()))
        log.info("training a %s on %d streamlines of %d runs (%s)", arch.description,
                 sum(len(s.streamlines) for s in subjects), len(subjects), device)
        with model_errors():
            result = train_tracker(subjects, inputs=spec, architecture=arch, settings=settings, device=device,
                                   checkpoint=args.checkpoint, resume=args.resume, progress=not args.no_progress)
    except ParameterError as exc:
        raise _library_errors(exc) from None
    training = training_record(entries, settings, device, **result.summary())
    save_model(out, result.model, spec, arch, training)
    print(f"{out}: {arch.description}; best validation loss {result.best_loss:.4f} at epoch {result.best_epoch} "
          f"of {len(result.history)} ({result.seconds:.0f} s)")
    return 0


def main(argv) -> int:
    from .config import Parser
    p = Parser(prog="tractoscale train-tracker",
               description="Train a learned tracker (recurrent or transformer network, PyTorch) on DWI runs "
                           "and reference tractograms; write one self-describing model file for "
                           "'--tracking learned --tracking-model FILE'.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
