"""Angular super-resolution: CSD peak accuracy in crossing voxels of a held-out demo subject (12 of 64
directions per shell, after SR, all 64), and the cost of prediction at HCP size.

    python benchmarks/bench_angular_sr.py                       # accuracy with the test's model + cost
    python benchmarks/bench_angular_sr.py --steps 600 --patch 8 # the train-angular-sr defaults
    python benchmarks/bench_angular_sr.py --skip-accuracy --device cuda

Accuracy:
1. writes subjects 1-2 of a demo dataset with shells 1000,2000 and 64 directions each (seed 0);
2. trains with ``tractoscale train-angular-sr`` on them (timed);
3. simulates subject 3 (held out: its own anatomy, head pose and noise) with its ground truth and runs
   :func:`bids_app.angular_sr.evaluate.compare` (CSD as the participant level fits it).

Cost: for a batch of patches, the input layers (once per batch) and one output pass (``q_out`` new
directions) timed (first run, then best of ``--repeats``) with the peak memory of the process, for the demo sizes and the published sizes, with the input
directions of a clinical scan (30 per shell on 3 shells) and of the demo; then extrapolated to an
HCP-sized grid (145 x 174 x 145 at 1.25 mm, a brain-shaped mask) asked for 60 new directions per
acquired shell.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cli(*args) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bids_app.cli", *map(str, args)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def accuracy(args, tmp: Path) -> dict:
    from bids_app.angular_sr.evaluate import compare
    from bids_app.demo import make_demo_dataset
    from bids_app.demo.simulate import demo_grid, make_gradients, simulate_subject
    bids = make_demo_dataset(tmp / "bids", n_subjects=2, shells=(1000.0, 2000.0), n_directions=64, seed=0)
    model = tmp / "pccnn.pt"
    train_s = cli("train-angular-sr", model, "--from-demo", bids, "--steps", args.steps, "--patch", args.patch,
                  "--nthreads", args.nthreads, "--no-progress")
    shape, affine = demo_grid("small", "LAS")
    bvals, bvecs = make_gradients((1000.0, 2000.0), 64, seed=0)
    sim = simulate_subject(shape=shape, affine=affine, bvals=bvals, bvecs_voxel=bvecs, seed=3)
    t0 = time.perf_counter()
    res = compare(sim, model, n_keep=12, n_new=52, device=args.device)
    res["train_seconds"] = round(train_s, 1)
    res["compare_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _pass_cost(hyper_name: str, patch: int, q_in: int, q_out: int, batch: int, device: str, repeats: int) -> dict:
    """Run in a child process so the peak RSS is this configuration's."""
    code = f"""
import json, resource, time, torch, sys
sys.path.insert(0, {str(ROOT)!r})
from bids_app.angular_sr.nets import DEMO_HYPER, Hyper, PCCNNModule
torch.set_num_threads({int(os.environ.get('BENCH_THREADS', '2'))})
net = PCCNNModule(DEMO_HYPER if {hyper_name!r} == 'demo' else Hyper()).to({device!r}).eval()
x = torch.randn({batch}, {patch}, {patch}, {patch}, {q_in}, device={device!r})
qi = torch.nn.functional.normalize(torch.randn({batch}, {q_in}, 3, device={device!r}), dim=-1)
qo = torch.nn.functional.normalize(torch.randn({batch}, {q_out}, 3, device={device!r}), dim=-1)
enc, dec = [], []
with torch.inference_mode():
    for _ in range({repeats} + 1):
        t = time.perf_counter(); a = net.pccnn.encode(x, qi)
        if {device!r} == 'cuda': torch.cuda.synchronize()
        t1 = time.perf_counter(); net.pccnn.decode(a, qi, qo)
        if {device!r} == 'cuda': torch.cuda.synchronize()
        enc.append(t1 - t); dec.append(time.perf_counter() - t1)
gpu = torch.cuda.max_memory_allocated() / 2**20 if {device!r} == 'cuda' else None
print(json.dumps({{"first_s": enc[0] + dec[0], "encode_s": min(enc[1:]), "decode_s": min(dec[1:]), "peak_rss_mib":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_peak_mib": gpu}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def hcp_patches(patch: int) -> int:
    """Patches with a brain voxel on a 145 x 174 x 145 grid (an ellipsoid of 1.2 million voxels)."""
    shape = np.array([145, 174, 145])
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    mask = (((g - shape / 2) / np.array([58, 75, 60])) ** 2).sum(-1) <= 1
    n = 0
    for i in range(0, shape[0], patch):
        for j in range(0, shape[1], patch):
            for k in range(0, shape[2], patch):
                n += bool(mask[i:i + patch, j:j + patch, k:k + patch].any())
    return n, int(mask.sum())


def cost(args) -> list:
    rows = []
    for name, patch in (("demo", 8), ("published", 10)):
        n_patches, n_vox = hcp_patches(patch)
        for label, q_in in (("3 shells x 30 directions", 90), ("2 shells x 12 directions", 24)):
            c = _pass_cost(name, patch, q_in, 10, args.batch, args.device, args.repeats)
            n_shells = 3 if q_in == 90 else 2
            batches, windows = -(-n_patches // args.batch), int(np.ceil(n_shells * 60 / 10))
            seconds = batches * (c["encode_s"] + windows * c["decode_s"])
            rows.append({"model": name, "patch": patch, "input": label, "batch": args.batch, **c,
                         "hcp_brain_voxels": n_vox, "hcp_patches": n_patches, "hcp_batches": batches,
                         "passes_per_batch": windows, "hcp_estimate_min": round(seconds / 60, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=150, type=int)
    p.add_argument("--patch", default=6, type=int)
    p.add_argument("--nthreads", default=2, type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default=4, type=int)
    p.add_argument("--repeats", default=2, type=int)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    args = p.parse_args()
    os.environ["BENCH_THREADS"] = str(args.nthreads)
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(accuracy(args, Path(tmp)), indent=1), flush=True)
    if not args.skip_cost:
        cost(args)
    print(f"load at the end {os.getloadavg()[0]:.1f}; self peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
