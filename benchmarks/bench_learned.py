"""Learned tracking: accuracy on a held-out demo subject next to ``--tracking prob`` on the same seeds,
and tracking speed (streamlines/s) on the CPU and, when PyTorch sees one, on a CUDA GPU.

    python benchmarks/bench_learned.py                          # the default demo, GRU model
    python benchmarks/bench_learned.py --model transformer --repeats 3

1. writes subjects 1-3 of the default demo dataset (``make demo``'s: small, seed 0);
2. trains with ``tractoscale train-tracker`` on sub-01 and sub-02 (default settings, timed);
3. runs the participant level on sub-03 twice, ``--tracking prob`` and ``--tracking learned``, with the
   same seeds (``--seeds-per-voxel``, WM seeding, FA stopping);
4. scores both tractograms against sub-03's true bundles (:mod:`bids_app.demo.scoring`);
5. times learned tracking alone on sub-03 (first run and best of ``--repeats``), next to the CPU
   probabilistic kernel on the same seeds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cli(*args) -> float:
    """Run ``tractoscale`` in a subprocess; returns its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bids_app.cli", *map(str, args)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def load_streamlines(path: Path):
    from trx.trx_file_memmap import load
    t = load(str(path))
    sls = [np.asarray(s, dtype=np.float64) for s in t.streamlines]
    t.close()
    return sls


def speed(bids: Path, deriv: Path, model: Path, per_voxel: int, repeats: int, nthreads: int):
    """Seconds of learned tracking (first run, best of the rest) per device, and of the prob kernel."""
    import nibabel as nib
    import torch

    from bids_app.inputs import load_dwi
    from kernels.api import TrackingRun
    from kernels.learned.api import LearnedTrackingRun

    torch.set_num_threads(nthreads)
    d = bids / "sub-03" / "dwi"
    o = deriv / "sub-03" / "dwi"
    dwi = load_dwi(d / "sub-03_dwi.nii.gz", d / "sub-03_dwi.bval", d / "sub-03_dwi.bvec")
    fa = np.asarray(nib.load(str(o / "sub-03_model-tensor_param-fa_dwimap.nii.gz")).dataobj).astype(np.float32)
    mask = np.asarray(nib.load(str(o / "sub-03_desc-brain_mask.nii.gz")).dataobj) > 0
    sh = np.asarray(nib.load(str(o / "sub-03_model-csd_param-sh_dwimap.nii.gz")).dataobj).astype(np.float32)
    seeds, stop = (fa > 0.25) & mask, fa * mask
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        times, n = [], 0
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            run = LearnedTrackingRun(model, dwi.data, dwi.bvals, dwi.bvecs, dwi.affine, frame="voxel", seeds=seeds,
                                     seeds_per_voxel=per_voxel, stopping=stop, stop_threshold=0.1, mask=mask,
                                     device=dev)
            n = sum(len(ch.lengths) for ch in run.chunks())
            times.append(time.perf_counter() - t0)
        rows.append((f"learned, {dev}" + (f" ({nthreads} threads)" if dev == "cpu" else ""), run.n_seeds, n,
                     times[0], min(times[1:])))
    import numba
    numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        run = TrackingRun(sh, dwi.affine, basis="tournier07", frame="voxel", seeds=seeds, seeds_per_voxel=per_voxel,
                          stopping=stop, stop_threshold=0.1, mask=mask, device="cpu",
                          step_size=0.5 * min(dwi.zooms), rng_seed=0)
        n = sum(len(ch.lengths) for ch in run.chunks())
        times.append(time.perf_counter() - t0)
    rows.append((f"prob kernel, cpu ({nthreads} threads)", run.n_seeds, n, times[0], min(times[1:])))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--model", default="gru", choices=("gru", "transformer"))
    p.add_argument("--head", default="sphere", choices=("sphere", "vmf"))
    p.add_argument("--seeds-per-voxel", type=int, default=4, help="as make demo (default: 4)")
    p.add_argument("--speed-seeds-per-voxel", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nthreads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory(prefix="bench_learned_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bids, model = work / "bids", work / f"{args.model}-{args.head}.safetensors"
        if not bids.exists():
            from bids_app.demo import make_demo_dataset
            make_demo_dataset(bids, n_subjects=3, size="small", seed=0)
        t_train = None      # a model left in --work by an earlier run is reused (delete it to retrain)
        if not model.exists():
            t_train = cli("train-tracker", model, "--from-demo", bids, "--participant-label", "01", "02",
                          "--model", args.model, "--head", args.head, "--nthreads", args.nthreads, "--no-progress")
        from kernels.learned.modelfile import read_info
        info = read_info(model)
        scores = {}
        from bids_app.demo.scoring import score_against_truth
        for alg in ("prob", "learned"):
            deriv = work / f"deriv-{alg}"
            extra = ["--tracking-model", model] if alg == "learned" else []
            cli(bids, deriv, "participant", "--participant-label", "03", "--skip-bids-validation", "--tracking", alg,
                *extra, "--seeds-per-voxel", args.seeds_per_voxel, "--nthreads", args.nthreads, "--force",
                "--no-progress")
            scores[alg] = score_against_truth(
                load_streamlines(deriv / "sub-03" / "dwi" / f"sub-03_track-{alg}_tractogram.trx"), bids, "03")
        rows = speed(bids, work / "deriv-prob", model, args.speed_seeds_per_voxel, args.repeats, args.nthreads)

    tr = info.training
    print(f"\ntraining: {info.architecture.description}; {tr['Epochs']} epochs (best {tr['BestEpoch']}), "
          f"{tr['Seconds']:.0f} s of training ({tr.get('CPUSeconds', float('nan')):.0f} s of CPU), "
          + (f"{t_train:.0f} s for the whole command, " if t_train else "(a model trained earlier), ")
          + f"{tr['Threads']} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"\nsub-03 (held out), {args.seeds_per_voxel} seeds per WM voxel, same seeds for both:\n")
    from bids_app.demo.phantom import BUNDLES
    print("| tracking | streamlines | points in true bundles (1-voxel dilated) | undilated | median angle to the "
          "true fibres | median length (mm) | bundles reached | least-covered bundle |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for alg, s in scores.items():
        reached = sum(s["members"][b] > 0 for b in BUNDLES)
        worst = min(BUNDLES, key=lambda b: s["coverage"][b])
        print(f"| {alg} | {s['n']} | {s['inside_dilated']:.3f} | {s['inside']:.3f} | {s['angle']:.1f} deg | "
              f"{s['median_length']:.1f} | "
              f"{reached}/{len(BUNDLES)} | {worst} {100 * s['coverage'][worst]:.0f}% of its voxels |")
    print("\n| tracker | seeds | streamlines | first run (s) | best of rest (s) | streamlines/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, seeds, n, first, best in rows:
        print(f"| {name} | {seeds} | {n} | {first:.2f} | {best:.2f} | {n / best:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
