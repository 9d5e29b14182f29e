"""Tractography speed: tractoscale (CPU, and CUDA when a GPU is present) vs DIPY vs MRtrix3 vs
GPUStreamlines (``cuslines``, when installed and a GPU is present).

Runs every tracker on the same demo subject, the same seeds and the same settings (probabilistic,
step, max angle 30 deg, PMF threshold 0.1, FA > 0.1 stopping, 10-250 mm), each in its own
process so that peak memory is its own, and prints seeds/s, streamlines/s, peak RSS and ratios
(of wall time, and of CPU time: all threads' user + system seconds, which a shared, busy machine
disturbs less than wall time).
"tractoscale cpu" times the chunk loop on prepared arrays (streaming to a TRX file); "tractoscale
stage" times the participant pipeline's whole tracking call (``bids_app.tracking.track_run``:
ODF table, seeding, tracking, TRX and sidecar) on the same seeds (its WM seed mask is the
benchmark's), against which DIPY's tracking call alone is compared.

    python benchmarks/bench_tracking.py                  # full demo subject, 1 seed per WM voxel
    python benchmarks/bench_tracking.py --size small --seeds-per-voxel 4
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- inputs
def prepare_inputs(size: str, per_voxel: int, n_seeds: int | None, work: Path) -> Path:
    from dipy.core.gradients import gradient_table
    from dipy.data import get_sphere
    from dipy.reconst.dti import TensorModel
    from dipy.reconst.shm import CsaOdfModel, sh_to_sf_matrix

    from bids_app.demo import demo_grid, make_gradients, simulate_subject
    from kernels.engine import MaskSeeder

    t0 = time.perf_counter()
    shape, aff = demo_grid(size)
    bvals, bvecs = make_gradients()
    sub = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=1,
                           size=size)
    gtab = gradient_table(bvals, bvecs=bvecs)
    mask = sub.brain_mask
    fa = np.nan_to_num(TensorModel(gtab).fit(sub.dwi, mask=mask).fa).astype(np.float32)
    order = 6
    fit = CsaOdfModel(gtab, sh_order_max=order, smooth=0.006).fit(sub.dwi, mask=mask)
    sph = get_sphere(name="repulsion724")
    b_desc, _ = sh_to_sf_matrix(sph, sh_order_max=order, basis_type="descoteaux07", legacy=True)
    _, inv_t = sh_to_sf_matrix(sph, sh_order_max=order, basis_type="tournier07", legacy=False)
    sh = (np.nan_to_num(fit.shm_coeff) @ (b_desc @ inv_t)).astype(np.float32)
    seed_mask = (fa > 0.25) & mask
    seeder = MaskSeeder(seed_mask, n_seeds=n_seeds, per_voxel=None if n_seeds else per_voxel,
                        rng_seed=1)
    seeds_vox = seeder.chunk(0, seeder.total)
    seeds_world = seeds_vox @ aff[:3, :3].T + aff[:3, 3]
    path = work / "inputs.npz"
    np.savez(path, sh=sh, fa=fa, mask=mask, affine=aff, seed_mask=seed_mask,
             seeds_world=seeds_world, step=0.5 * float(np.sqrt((aff[:3, :3] ** 2).sum(0)).min()),
             per_voxel=0 if n_seeds else per_voxel, n_seeds=n_seeds or 0)
    print(f"inputs: {size} subject {shape}, {int(mask.sum())} brain voxels, "
          f"{len(seeds_world)} seeds, prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


# ----------------------------------------------------------------------------- workers
def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its finished children (tckgen): on a
    shared machine a ratio of CPU time is a steadier measure of work than one of wall time."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM).  Not ``getrusage``'s ru_maxrss: Linux carries
    that across fork and exec, so a worker would report the parent's peak (the simulated subject)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
SETTINGS = dict(max_angle=30.0, pmf_threshold=0.1, min_length=10.0, max_length=250.0,
                stop_threshold=0.1)


def worker_ours(inputs: Path, device: str, out_dir: Path) -> dict:
    from bids_app.trx_writer import TrxStreamWriter
    from kernels.engine import PointSeeder, TrackParams, Tracker, iter_chunks, prepare

    d = np.load(inputs)
    aff, step = d["affine"], float(d["step"])
    params = TrackParams(step_size=step, rng_seed=1, **SETTINGS)
    data = prepare(sh=d["sh"], affine=aff, params=params, stop_map=d["fa"] * d["mask"],
                   mask=d["mask"])
    tracker = Tracker(data, device)
    seeds = PointSeeder(d["seeds_world"], affine=aff)
    warm = PointSeeder(d["seeds_world"][:256], affine=aff)
    for _ in iter_chunks(tracker, warm, 256):  # compile / load the cache outside the timing
        pass
    base = _rss_mb()
    dt = cpu = float("inf")
    for _ in range(REPEAT):  # best of REPEAT: the machine may be shared
        t0, c0 = time.perf_counter(), _cpu_seconds()
        n_sl = n_pts = 0
        with TrxStreamWriter(out_dir / f"ours_{device}.trx", aff, d["mask"].shape) as w:
            for ch in iter_chunks(tracker, seeds, None):
                w.append(ch.positions, ch.lengths)
                n_sl += len(ch.lengths)
                n_pts += len(ch.positions)
        dt = min(dt, time.perf_counter() - t0)
        cpu = min(cpu, _cpu_seconds() - c0)
    return dict(name=f"tractoscale {device}", seconds=dt, cpu_seconds=cpu, n_seeds=seeds.total,
                n_streamlines=n_sl, n_points=n_pts, peak_rss_mb=_peak_mb(),
                tracking_rss_mb=_peak_mb() - base, odf_mode=data.odf_mode,
                chunk=tracker.auto_chunk_size())


def worker_stage(inputs: Path, out_dir: Path) -> dict:
    """The participant pipeline's tracking stage, whole: ``track_run`` from the maps to the file."""
    from bids_app.config import Tracking
    from bids_app.tracking import RunMaps, track_run

    d = np.load(inputs)
    maps = RunMaps(affine=d["affine"], mask=d["mask"], fa=d["fa"], sh=d["sh"], sh_order=6, odf_model="csa")
    seeds = dict(n_seeds=int(d["n_seeds"])) if int(d["n_seeds"]) else dict(seeds_per_voxel=int(d["per_voxel"]))
    kw = dict(step_size=float(d["step"]), rng_seed=1, stop_method="fa", seeding="wm", **SETTINGS)
    track_run(Tracking(n_seeds=256, **kw), maps, out_dir / "stage_warm.trx", device="cpu", progress=False)
    base = _rss_mb()
    dt = cpu = float("inf")
    for _ in range(REPEAT):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        stats = track_run(Tracking(**seeds, **kw), maps, out_dir / "stage.trx", device="cpu", progress=False)
        dt = min(dt, time.perf_counter() - t0)
        cpu = min(cpu, _cpu_seconds() - c0)
    return dict(name="tractoscale stage (track_run, cpu)", seconds=dt, cpu_seconds=cpu, n_seeds=stats["n_seeds"],
                n_streamlines=stats["n_streamlines"], n_points=stats["n_points"], peak_rss_mb=_peak_mb(),
                tracking_rss_mb=_peak_mb() - base)


def worker_dipy(inputs: Path, threads: int) -> dict:
    from dipy.data import default_sphere
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.tracker import probabilistic_tracking

    d = np.load(inputs)
    stop = ThresholdStoppingCriterion((d["fa"] * d["mask"]).astype(np.float64), SETTINGS["stop_threshold"])
    sh = d["sh"].astype(np.float64)
    kw = dict(sh=sh, sphere=default_sphere, basis_type="tournier07", legacy=False,
              step_size=float(d["step"]), min_len=SETTINGS["min_length"],
              max_len=SETTINGS["max_length"], max_angle=SETTINGS["max_angle"],
              pmf_threshold=SETTINGS["pmf_threshold"], nbr_threads=threads, random_seed=1)
    list(probabilistic_tracking(d["seeds_world"][:256], stop, d["affine"], **kw))  # warm-up
    base = _rss_mb()
    dt = cpu = float("inf")
    for _ in range(REPEAT):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        sls = probabilistic_tracking(d["seeds_world"], stop, d["affine"], **kw)
        n_sl = n_pts = 0
        for s in sls:
            n_sl += 1
            n_pts += len(s)
        del sls
        dt = min(dt, time.perf_counter() - t0)
        cpu = min(cpu, _cpu_seconds() - c0)
    return dict(name=f"DIPY probabilistic_tracking ({threads} threads)", seconds=dt, cpu_seconds=cpu,
                n_seeds=len(d["seeds_world"]), n_streamlines=n_sl, n_points=n_pts,
                peak_rss_mb=_peak_mb(), tracking_rss_mb=_peak_mb() - base)


def worker_cuslines(inputs: Path) -> dict:
    """GPUStreamlines (PyPI ``cuslines``) probabilistic tracking on the same ODFs, seeds and stopping.

    cuslines takes ODFs sampled on a sphere, seeds and step size in voxels, and lengths as point
    counts; it has no PMF threshold option.
    """
    from math import radians

    import nibabel as nib
    from dipy.data import default_sphere
    from dipy.reconst.shm import sh_to_sf_matrix

    import cuslines
    if cuslines.BACKEND != "cuda":
        raise RuntimeError(f"cuslines found no CUDA GPU (backend {cuslines.BACKEND})")
    d = np.load(inputs)
    aff, step_mm = d["affine"], float(d["step"])
    order = int(round((np.sqrt(8 * d["sh"].shape[-1] + 1) - 3) / 2))
    b, _ = sh_to_sf_matrix(default_sphere, sh_order_max=order, basis_type="tournier07", legacy=False)
    odf = np.clip(d["sh"] @ b.astype(np.float32), 0, None)
    vox = float(np.sqrt((aff[:3, :3] ** 2).sum(0)).mean())
    seeds_vox = (d["seeds_world"] - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    ref = nib.Nifti1Image(d["fa"].astype(np.float32), aff)
    kw = dict(sphere_symm=False, max_angle=radians(SETTINGS["max_angle"]), step_size=step_mm / vox,
              min_pts=int(SETTINGS["min_length"] / step_mm), max_pts=int(SETTINGS["max_length"] / step_mm),
              ngpus=1, rng_seed=1)
    stop = (d["fa"] * d["mask"]).astype(np.float64)
    with cuslines.Tracker(cuslines.ProbDirectionGetter(), odf.astype(np.float64), stop,
                          SETTINGS["stop_threshold"], default_sphere.vertices, default_sphere.edges,
                          **kw) as tracker:
        tracker.generate_sft(seeds_vox[:256], ref)  # warm-up
        dt = cpu = float("inf")
        for _ in range(REPEAT):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            sft = tracker.generate_sft(seeds_vox, ref)
            n_sl = len(sft.streamlines)
            n_pts = int(sum(len(s) for s in sft.streamlines))
            dt = min(dt, time.perf_counter() - t0)
            cpu = min(cpu, _cpu_seconds() - c0)
    return dict(name="GPUStreamlines cuslines (1 GPU)", seconds=dt, cpu_seconds=cpu, n_seeds=len(seeds_vox),
                n_streamlines=n_sl, n_points=n_pts, peak_rss_mb=_peak_mb(), tracking_rss_mb=float("nan"))


def run_tckgen(inputs: Path, threads: int, work: Path) -> dict | None:
    """MRtrix3 iFOD1 (probabilistic, first order) at matched settings, when installed."""
    exe = shutil.which("tckgen")
    if exe is None:
        return None
    import nibabel as nib
    d = np.load(inputs)
    aff = d["affine"]
    nib.save(nib.Nifti1Image(d["sh"], aff), work / "sh.nii")
    nib.save(nib.Nifti1Image(d["seed_mask"].astype(np.uint8), aff), work / "seed.nii")
    nib.save(nib.Nifti1Image((d["fa"] * d["mask"]).astype(np.float32), aff), work / "fa.nii")
    n = len(d["seeds_world"])
    cmd = [exe, str(work / "sh.nii"), str(work / "mrtrix.tck"), "-algorithm", "iFOD1",
           "-seed_image", str(work / "seed.nii"), "-seeds", str(n), "-step", str(float(d["step"])),
           "-angle", str(SETTINGS["max_angle"]), "-minlength", str(SETTINGS["min_length"]),
           "-maxlength", str(SETTINGS["max_length"]), "-mask", str(work / "seed.nii"),
           "-nthreads", str(threads), "-force", "-quiet"]
    dt = cpu = float("inf")
    for _ in range(REPEAT):  # best of REPEAT, as for the others; each run includes tckgen's start-up
        t0, c0 = time.perf_counter(), _cpu_seconds()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd if Path("/usr/bin/time").exists()
                              else cmd, capture_output=True, text=True)
        dt = min(dt, time.perf_counter() - t0)
        cpu = min(cpu, _cpu_seconds() - c0)
        if proc.returncode != 0:
            print("tckgen failed:", proc.stderr[-500:])
            return None
    peak = float(proc.stderr.strip().splitlines()[-1]) / 1024 if Path("/usr/bin/time").exists() \
        else float("nan")
    n_sl = int(nib.streamlines.load(str(work / "mrtrix.tck"), lazy_load=True).header["count"])
    return dict(name=f"MRtrix3 tckgen iFOD1 ({threads} threads)", seconds=dt, cpu_seconds=cpu, n_seeds=n,
                n_streamlines=n_sl, n_points=-1, peak_rss_mb=peak, tracking_rss_mb=float("nan"))


def _spawn(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__] + args, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="full", choices=("small", "full"))
    p.add_argument("--seeds-per-voxel", type=int, default=1)
    p.add_argument("--n-seeds", type=int, default=None)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--skip-dipy", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", choices=("cpu", "cuda", "stage", "dipy", "cuslines"), help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        if a.worker == "dipy":
            res = worker_dipy(a.inputs, a.threads)
        elif a.worker == "cuslines":
            res = worker_cuslines(a.inputs)
        elif a.worker == "stage":
            res = worker_stage(a.inputs, a.out)
        else:
            res = worker_ours(a.inputs, a.worker, a.out)
        print(json.dumps(res))
        return 0

    from kernels.device import real_gpu_available
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as tmp:
        work = Path(tmp)
        inputs = prepare_inputs(a.size, a.seeds_per_voxel, a.n_seeds, work)
        env = {"NUMBA_NUM_THREADS": str(a.threads)}
        common = ["--inputs", str(inputs), "--out", str(work), "--threads", str(a.threads)]
        results = [_spawn(["--worker", "cpu"] + common, env), _spawn(["--worker", "stage"] + common, env)]
        if real_gpu_available():
            results.append(_spawn(["--worker", "cuda"] + common, env))
            if importlib.util.find_spec("cuslines") is not None:
                try:
                    results.append(_spawn(["--worker", "cuslines"] + common, env))
                except RuntimeError as exc:
                    print("cuslines failed:", str(exc)[-800:])
        if not a.skip_dipy:
            results.append(_spawn(["--worker", "dipy"] + common, env))
        mr = run_tckgen(inputs, a.threads, work)
        if mr:
            results.append(mr)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {os.cpu_count()} CPUs ({a.threads} used), load average {load:.1f}, "
          f"size={a.size}, best of {REPEAT} runs each")
    print(f"{'tracker':45s} {'s':>8s} {'CPU s':>8s} {'seeds/s':>10s} {'strml/s':>10s} {'n_strml':>8s} "
          f"{'peak MB':>8s} {'track MB':>8s}")
    for r in results:
        r["seeds_per_s"] = r["n_seeds"] / r["seconds"]
        r["streamlines_per_s"] = r["n_streamlines"] / r["seconds"]
        print(f"{r['name']:45s} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {r['seeds_per_s']:10.0f} "
              f"{r['streamlines_per_s']:10.0f} {r['n_streamlines']:8d} {r['peak_rss_mb']:8.0f} "
              f"{r['tracking_rss_mb']:8.0f}")
    ours = [r for r in results if r["name"].startswith("tractoscale")]
    for o in ours:
        for r in results:
            if r["name"].startswith("tractoscale"):
                continue
            print(f"ratio {o['name']} / {r['name']}: seeds/s x{o['seeds_per_s'] / r['seeds_per_s']:.2f}, "
                  f"CPU time x{r['cpu_seconds'] / o['cpu_seconds'] * o['n_seeds'] / r['n_seeds']:.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
