"""The GPU check: CUDA-vs-CPU parity, CUDA start-up, and tractoscale CUDA vs GPUStreamlines.

Run by ``benchmarks/gpu_check.sh`` on a machine with a GPU (see there); every step is timed and
guarded, so one failing step (say, ``cuslines`` not loading) does not hide the others.  Prints a
summary table last and writes everything to ``OUT/gpu_check.json``.

Steps:
  inputs    the ``full`` demo subject (90x108x90, 2 mm), CSA order 6, the 724-direction sphere,
            step 0.5 mm (``--step``; the goal's), max angle 30, FA > 0.1 stopping, 10-250 mm;
            N random seeds in voxels with FA > 0.25 (the other settings of ``bench_tracking.py``)
  startup   first launch (compile) in a fresh process with an empty ``NUMBA_CACHE_DIR``, then
            again in another process with the same folder (the CUDA disk cache)
  parity    the same seeds on the CPU and the GPU in float32 and float64: seed indices, points
            identical to 1e-3 mm (a GPU fuses multiply-adds, so a near-tie can flip and a
            streamline diverge), counts and mean lengths
  speed     seeds/s of the whole chunk loop (seeds to packed points on the host), best of 3
  cuslines  GPUStreamlines' probabilistic tracking on the same ODFs (sampled on the full sphere),
            seeds and stopping, best of 3, and the ratio

    python benchmarks/gpu_check.py --out /tmp/gpu_check                   # on the GPU machine
    NUMBA_ENABLE_CUDASIM=1 TRACTOSCALE_ALLOW_CUDASIM=1 \\
        python benchmarks/gpu_check.py --size small --n-seeds 64 --simulate   # the code path, here
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

if not hasattr(np, "row_stack"):      # NumPy 2.5 removed it; numba-cuda 0.30 still calls it
    np.row_stack = np.vstack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def step(results: dict, name: str, fn, *args, **kw):
    t0 = time.perf_counter()
    log(f"{name} ...")
    try:
        results[name] = fn(*args, **kw)
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{name}: {json.dumps(results[name])[:400]}")
    except Exception as exc:  # a failed step is reported, the others still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                         "traceback": traceback.format_exc()[-3000:]}
        log(f"{name} FAILED: {results[name]['error'][:400]}")


# ----------------------------------------------------------------------------- steps
def environment() -> dict:
    import numba
    from numba import cuda
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "numba": numba.__version__}
    try:
        import importlib.metadata as md
        out["numba_cuda"] = md.version("numba-cuda")
    except Exception:
        out["numba_cuda"] = "?"
    if cuda.is_available():
        dev = cuda.get_current_device()
        name = getattr(dev, "name", "CUDA simulator")
        out.update(gpu=name.decode() if isinstance(name, bytes) else str(name),
                   compute_capability=list(dev.compute_capability),
                   sms=getattr(dev, "MULTIPROCESSOR_COUNT", 0), n_gpus=len(cuda.gpus))
    out["cpus"] = os.cpu_count()
    return out


def make_inputs(size: str, n_seeds: int, work: Path, step_mm: float | None = None) -> dict:
    from bench_tracking import prepare_inputs
    path = prepare_inputs(size, 1, n_seeds, work)
    d = dict(np.load(path))
    if step_mm is not None:        # every step below (and cuslines) reads the step from the inputs
        d["step"] = np.float64(step_mm)
        np.savez(path, **d)
    return {"path": str(path), "n_seeds": int(len(d["seeds_world"])), "shape": list(d["fa"].shape),
            "step_mm": float(d["step"])}


def _tracking(inputs: str, device: str, precision: str | None, n: int | None = None):
    from kernels.engine import PointSeeder, TrackParams, Tracker, prepare
    from bench_tracking import SETTINGS
    d = np.load(inputs)
    aff, step = d["affine"], float(d["step"])
    params = TrackParams(step_size=step, rng_seed=1, **SETTINGS)
    data = prepare(sh=d["sh"], affine=aff, params=params, stop_map=d["fa"] * d["mask"], mask=d["mask"])
    seeds = d["seeds_world"] if n is None else d["seeds_world"][:n]
    return Tracker(data, device, precision=precision), PointSeeder(seeds, affine=aff)


def first_launch(inputs: str) -> dict:
    """In this process: build the tracker and track 256 seeds (compiles or loads the kernels)."""
    from kernels.engine import track_all
    t0 = time.perf_counter()
    tracker, seeds = _tracking(inputs, "cuda", None, 256)
    t1 = time.perf_counter()
    track_all(tracker, seeds, chunk_size=256)
    return {"prepare_s": round(t1 - t0, 2), "first_chunk_s": round(time.perf_counter() - t1, 2)}


def startup(inputs: str, work: Path) -> dict:
    cache = work / "numba_cache"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["NUMBA_CACHE_DIR"] = str(cache)
    out = {}
    for name in ("cold", "warm"):
        proc = subprocess.run([sys.executable, __file__, "--first-launch", inputs], capture_output=True,
                              text=True, env=env, timeout=400)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    files = [f for f in cache.rglob("*") if f.is_file()]
    out["cache_files"] = len(files)
    out["cache_mb"] = round(sum(f.stat().st_size for f in files) / 2 ** 20, 1)
    return out


def parity(inputs: str, n: int) -> dict:
    from kernels.engine import track_all
    out = {}
    for precision in ("float32", "float64"):
        res = {}
        for device in ("cpu", "cuda"):
            tracker, seeds = _tracking(inputs, device, precision, n)
            res[device] = track_all(tracker, seeds, chunk_size=n)
        (a, ia), (b, ib) = res["cpu"], res["cuda"]
        same_idx = bool(np.array_equal(ia, ib))
        ident = sum(len(x) == len(y) and float(np.abs(x - y).max()) < 1e-3 for x, y in zip(a, b)) if same_idx else 0
        la = float(np.mean([len(x) for x in a])) if a else 0.0
        lb = float(np.mean([len(x) for x in b])) if b else 0.0
        out[precision] = {"cpu_streamlines": len(a), "cuda_streamlines": len(b), "same_seed_indices": same_idx,
                          "identical_1e-3mm": ident, "identical_fraction": round(ident / max(len(a), 1), 4),
                          "cpu_mean_points": round(la, 2), "cuda_mean_points": round(lb, 2)}
    return out


def speed(inputs: str, repeat: int, precision: str = "float32") -> dict:
    from kernels.engine import iter_chunks
    tracker, seeds = _tracking(inputs, "cuda", precision)
    for _ in iter_chunks(tracker, type(seeds)(seeds.points[:256]), 256):   # compile/load outside the timing
        pass
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        n_sl = n_pts = 0
        for ch in iter_chunks(tracker, seeds, None):
            n_sl += len(ch.lengths)
            n_pts += len(ch.positions)
        best = min(best, time.perf_counter() - t0)
    return {"precision": precision, "n_seeds": seeds.total, "best_s": round(best, 3),
            "seeds_per_s": round(seeds.total / best), "streamlines": n_sl, "points": n_pts,
            "chunk": tracker.auto_chunk_size()}


def cuslines_speed(inputs: str, repeat: int) -> dict:
    import bench_tracking
    bench_tracking.REPEAT = repeat
    r = bench_tracking.worker_cuslines(Path(inputs))
    return {"best_s": round(r["seconds"], 3), "seeds_per_s": round(r["n_seeds"] / r["seconds"]),
            "streamlines": r["n_streamlines"], "points": r["n_points"]}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")))
    p.add_argument("--size", default="full", choices=("small", "full"))
    p.add_argument("--step", type=float, default=0.5,
                   help="step in mm (default 0.5: the issue's goal; 0 keeps bench_tracking's half voxel)")
    p.add_argument("--n-seeds", type=int, default=500_000)
    p.add_argument("--parity-seeds", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--simulate", action="store_true", help="CUDA simulator: check the code path only")
    p.add_argument("--first-launch", metavar="INPUTS", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.first_launch:
        print(json.dumps(first_launch(a.first_launch)))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(a).items()}}
    step(results, "environment", environment)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        step(results, "inputs", make_inputs, a.size, a.n_seeds, work, a.step or None)
        inputs = results["inputs"].get("path")
        if inputs:
            step(results, "startup", startup, inputs, work)
            step(results, "parity", parity, inputs, a.parity_seeds)
            step(results, "speed", speed, inputs, a.repeat)
            if not a.simulate:
                step(results, "speed_float64", speed, inputs, 1, "float64")
                step(results, "cuslines", cuslines_speed, inputs, min(a.repeat, 2))
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    summary(results)
    return 0


def summary(r: dict) -> None:
    def get(*keys, default="n/a"):
        x = r
        for k in keys:
            if not isinstance(x, dict) or k not in x:
                return default
            x = x[k]
        return x
    print("\n==== GPU check summary ====")
    env = r.get("environment", {})
    print(f"GPU: {env.get('gpu', '?')} (cc {env.get('compute_capability', '?')}, {env.get('sms', '?')} SMs); "
          f"numba {env.get('numba', '?')}, numba-cuda {env.get('numba_cuda', '?')}, numpy {env.get('numpy', '?')}")
    print(f"inputs: {get('inputs', 'n_seeds')} seeds, grid {get('inputs', 'shape')}, step {get('inputs', 'step_mm')} mm")
    print(f"start-up (first 256-seed chunk, compile included): cold {get('startup', 'cold', 'first_chunk_s')} s, "
          f"warm (disk cache) {get('startup', 'warm', 'first_chunk_s')} s")
    for prec in ("float32", "float64"):
        q = get("parity", prec, default={})
        if isinstance(q, dict) and q:
            print(f"parity {prec}: CPU {q['cpu_streamlines']} / CUDA {q['cuda_streamlines']} streamlines, "
                  f"same seeds {q['same_seed_indices']}, identical {q['identical_fraction']:.1%}, mean points "
                  f"{q['cpu_mean_points']} / {q['cuda_mean_points']}")
    ours, theirs = get("speed", "seeds_per_s"), get("cuslines", "seeds_per_s")
    print(f"tractoscale CUDA float32: {ours} seeds/s ({get('speed', 'best_s')} s for {get('speed', 'n_seeds')} seeds); "
          f"float64: {get('speed_float64', 'seeds_per_s')} seeds/s")
    print(f"GPUStreamlines (cuslines): {theirs} seeds/s ({get('cuslines', 'best_s')} s)")
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        print(f"ratio tractoscale / cuslines: x{ours / theirs:.2f}")
    failed = [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
    print(f"failed steps: {', '.join(failed) if failed else 'none'}")


if __name__ == "__main__":
    sys.exit(main())
