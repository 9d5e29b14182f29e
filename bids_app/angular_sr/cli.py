"""``tractoscale train-angular-sr MODEL ...``: train a PCCNN for ``--angular-sr`` on DWI runs.

Training data are DWI runs with their ``.bval``/``.bvec`` beside them (BIDS naming): ``--dwi FILE``
(repeatable) or ``--from-demo BIDS_DIR`` for the subjects of a demo dataset.  All runs must have the
same shells; the model supports those shells only.  The model file records the layer sizes, the
shells, the patch size and the provenance of its data (file names and SHA-256 of every DWI).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import InputDataError, NoInputError, UsageError

log = logging.getLogger("tractoscale.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model file to write (.pt)")
    data = p.add_argument_group("training data")
    data.add_argument("--dwi", action="append", type=Path, default=[], metavar="FILE",
                      help="a DWI run (.nii[.gz] with .bval/.bvec beside it); repeat for more")
    data.add_argument("--from-demo", type=Path, metavar="BIDS_DIR",
                      help="the DWI runs of a demo dataset ('tractoscale demo-data --shells 1000,2000 "
                           "--directions 64')")
    data.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                      help="with --from-demo: the subjects to train on (default: all)")
    net = p.add_argument_group("model")
    net.add_argument("--size", default="demo", choices=("demo", "published"),
                     help="layer sizes: demo (about 12 thousand parameters, minutes on a CPU) or published "
                          "(the paper's, about 0.77 million; needs a GPU) (default: demo)")
    fit = p.add_argument_group("optimisation")
    fit.add_argument("--steps", type=int, default=600, metavar="N", help="optimisation steps (default: 600)")
    fit.add_argument("--batch-size", type=int, default=6, metavar="N", help="patches per step (default: 6)")
    fit.add_argument("--patch", type=int, default=8, metavar="N",
                     help="patch side in voxels, also used for prediction (default: 8)")
    fit.add_argument("--q-in", type=int, nargs=2, default=(8, 16), metavar=("MIN", "MAX"),
                     help="input directions per shell, drawn in [MIN, MAX] each step (default: 8 16)")
    fit.add_argument("--q-out", type=int, default=10, metavar="N",
                     help="target directions per step, also per prediction pass (default: 10)")
    fit.add_argument("--learning-rate", type=float, default=2e-3, metavar="F",
                     help="AdamW's, cosine-annealed (default: 0.002)")
    fit.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    run = p.add_argument_group("resources")
    run.add_argument("--nthreads", type=int, metavar="N", help="CPU threads (default: all available)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="PyTorch device: CUDA if a GPU is visible (auto) (default: auto)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo_runs(bids_dir: Path, labels) -> list[Path]:
    from ..demo.dataset import is_demo_dataset
    if not is_demo_dataset(bids_dir):
        raise UsageError(f"--from-demo {bids_dir}: not a dataset written by 'tractoscale demo-data'")
    runs = [d for d in sorted(bids_dir.glob("sub-*/**/dwi/*_dwi.nii.gz"))
            if not labels or d.name.split("_")[0].removeprefix("sub-") in labels]
    found = {d.name.split("_")[0].removeprefix("sub-") for d in runs}
    missing = sorted(set(labels or ()) - found)
    if missing:
        raise UsageError(f"--participant-label: no such subject in {bids_dir}: {', '.join(missing)}")
    return runs


def _check(args) -> None:
    for name, v, lo in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1), ("--patch", args.patch, 3),
                        ("--q-out", args.q_out, 1), ("--q-in", args.q_in[0], 1)):
        if v < lo:
            raise UsageError(f"{name} must be >= {lo} (got {v})")
    if args.q_in[1] < args.q_in[0]:
        raise UsageError(f"--q-in: MAX ({args.q_in[1]}) is below MIN ({args.q_in[0]})")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0 (got {args.learning_rate})")
    if args.nthreads is not None and args.nthreads < 1:
        raise UsageError(f"--nthreads must be >= 1 (got {args.nthreads})")


def load_run(path: Path, shells, percentile: float):
    from ..inputs import compute_mask, load_dwi
    from ..models import shells as data_shells
    from ..train_tracker import _gradient_files
    from kernels.learned.modelfile import file_sha256
    from .train import prepare_run
    if not path.is_file():
        raise NoInputError(f"{path} does not exist")
    bval, bvec = _gradient_files(path)
    for f in (bval, bvec):
        if not f.is_file():
            raise NoInputError(f"{f} (the gradient table of {path.name}) does not exist")
    dwi = load_dwi(path, bval, bvec)
    found = tuple(data_shells(dwi.bvals))
    if shells is not None and found != shells:
        raise InputDataError(f"{path.name}: shells {', '.join(str(int(s)) for s in found)} differ from the first "
                             f"run's ({', '.join(str(int(s)) for s in shells)}); train on runs with the same shells")
    run = prepare_run(dwi.data, dwi.bvals, dwi.bvecs, compute_mask(dwi.mean_b0), found, percentile, name=path.name)
    entry = {"DWI": path.name, "SHA256": file_sha256(path), "Volumes": int(dwi.data.shape[3])}
    return run, entry, found


def run(args) -> int:
    from ..learned import prepare_torch, require_learn_extra, training_record
    require_learn_extra("train-angular-sr")
    _check(args)
    paths = list(args.dwi)
    if args.from_demo is not None:
        paths += demo_runs(Path(args.from_demo), tuple(str(x).removeprefix("sub-") for x in args.participant_label or ()))
    elif args.participant_label:
        raise UsageError("--participant-label goes with --from-demo")
    if not paths:
        raise UsageError("no training data: give --dwi FILE or --from-demo BIDS_DIR")
    from ..derivatives import writable_parent
    out = writable_parent(args.model)
    prepare_torch(args.nthreads)
    from kernels.errors import DeviceError
    from kernels.learned.api import torch_device

    from .modelfile import save_model
    from .nets import DEMO_HYPER, Hyper
    from .train import TrainSettings, train
    try:
        device = torch_device(args.device)
    except DeviceError as exc:
        raise UsageError(f"--device {args.device}: {exc}") from None
    runs, entries, shells = [], [], None
    for p in paths:
        log.info("reading %s", p.name)
        r, entry, shells = load_run(Path(p), shells, 99.0)
        runs.append(r)
        entries.append(entry)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, patch=args.patch, q_in_min=args.q_in[0],
                             q_in_max=args.q_in[1], q_out=args.q_out, learning_rate=args.learning_rate, seed=args.seed)
    hyper = DEMO_HYPER if args.size == "demo" else Hyper()
    log.info("training a PCCNN (%s sizes) on %d runs, shells %s, on %s", args.size, len(runs),
             ", ".join(str(int(s)) for s in shells), device)
    try:
        module, summary = train(runs, hyper, settings, device=device, progress=not args.no_progress)
    except ValueError as exc:
        raise InputDataError(str(exc)) from None
    training = training_record(entries, settings, device, Size=args.size, **summary)
    save_model(out, module, shells=shells, patch=args.patch, q_out=args.q_out, training=training)
    print(f"{out}: PCCNN ({summary['Parameters']} parameters), shells {', '.join(str(int(s)) for s in shells)}; "
          f"L1 loss {summary['FirstLoss']:.3f} -> {summary['FinalLoss']:.3f} in {summary['Seconds']:.0f} s")
    return 0


def main(argv) -> int:
    from ..config import Parser
    p = Parser(prog="tractoscale train-angular-sr",
               description="Train a spatio-angular parametric continuous convolution network (PCCNN) that predicts "
                           "the DWI signal at unseen gradient directions; write a model file for "
                           "'--angular-sr MODEL'.")
    add_arguments(p)
    return run(p.parse_args(argv))
