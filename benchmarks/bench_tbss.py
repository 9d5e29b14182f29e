"""Benchmark: coarse-first ``auto`` target selection vs full all-to-all (TBSS ``-n``).

Simulates N demo subjects (``bids_app.demo``, DTI fitted with dipy) on a grid of the given
voxel size, then runs on the same executor:

* coarse all-to-all (what ``--tbss-target auto`` does) + the N-1 full registrations to the target;
* full all-to-all at full resolution (what FSL's ``tbss_2_reg -n`` does).

Both use one task per unordered pair (one affine, SyN both ways).  Reports wall time,
CPU seconds per registration (one direction), the targets chosen, the measured speed-up
and the speed-up extrapolated to larger N from the per-task CPU costs.

    python benchmarks/bench_tbss.py --n-subjects 5 --zooms 2.0 --nthreads 2 [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-subjects", type=int, default=5)
    p.add_argument("--zooms", type=float, default=2.0, help="voxel size (mm) of the simulated subjects")
    p.add_argument("--nthreads", type=int, default=2, help="worker processes")
    p.add_argument("--quick", action="store_true", help="the --tbss-quick registration settings")
    p.add_argument("--undeformed", type=int, default=0,
                   help="index of a subject without warp (-1: none), the natural target")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--extrapolate", type=int, nargs="+", default=[20, 100])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from bids_app.group.executor import make_executor, run_tasks
    from bids_app.group.tbss.collect import collect_maps
    from bids_app.group.tbss.register import registration_task, settings
    from bids_app.group.tbss.synthetic import demo_cohort
    from bids_app.group.tbss.target import select_auto
    from bids_app.group.transforms import transform_paths
    from bids_app.stages import Stage

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_tbss_"))
    n = a.n_subjects
    t0 = time.perf_counter()
    demo_cohort(work / "bids", work / "out", n_controls=n - n // 2, n_patients=n // 2, zooms=a.zooms,
                undeformed=None if a.undeformed < 0 else a.undeformed)
    t_sim = time.perf_counter() - t0
    found, _, _ = collect_maps(work / "out")
    import nibabel as nib
    shape = nib.load(str(found[0].paths["fa"])).shape
    res = {"machine": f"{os.cpu_count()} CPUs ({_cpu_info()})", "workers": a.nthreads, "n_subjects": n,
           "zooms_mm": a.zooms, "grid": list(shape), "quick": a.quick, "simulation_s": round(t_sim, 1)}

    def pair_cpu(stage):
        rows = [json.loads(f.read_text()) for f in (work / "sel" / stage).glob("pair-*_score.json")]
        return (sum(r["CPUSeconds"] for r in rows) / len(rows), rows[0].get("Subsampling", 1)) if rows else (0, 1)

    with make_executor(a.nthreads) as ex:
        # warm the workers (imports, numba caches) so that neither side pays for it
        list(run_tasks(ex, _noop, [((), {})] * a.nthreads, desc="warm-up", disable_progress=True))
        t0 = time.perf_counter()
        coarse = select_auto(found, ex, out_dir=work / "sel", quick=a.quick, disable_progress=True)
        t_coarse_sel = time.perf_counter() - t0
        t0 = time.perf_counter()
        st = settings("full", a.quick)
        calls = [(({"path": str(pm.paths["fa"]), "kind": "fa"}, {"path": str(found[coarse.index].paths["fa"]),
                                                                 "kind": "fa"}, st.as_dict()),
                  {"output_dir": str(work / "out"), "entities": pm.entities, "space": "bench", "chain": None,
                   "meta": {}, "stage": Stage(f"{pm.label}_to-bench",
                                              outputs=transform_paths(work / "out", pm.entities, "bench"))})
                 for i, pm in enumerate(found) if i != coarse.index]
        reg_cpu = [r["CPUSeconds"] for _, r in run_tasks(ex, registration_task, calls, desc="to target",
                                                          disable_progress=True)]
        t_fine = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = select_auto(found, ex, out_dir=work / "sel", quick=a.quick, full=True, disable_progress=True)
        t_full_sel = time.perf_counter() - t0

    c_pair, factor = pair_cpu("coarse")
    f_pair, _ = pair_cpu("full")
    reg = sum(reg_cpu) / len(reg_cpu)
    res.update({
        "coarse_subsampling": factor,
        "target_coarse_first": coarse.label, "target_full_all_to_all": full.label,
        "same_target": coarse.label == full.label,
        "wall_s": {"coarse_all_to_all": round(t_coarse_sel, 2), "registrations_to_target": round(t_fine, 2),
                   "coarse_first_total": round(t_coarse_sel + t_fine, 2), "full_all_to_all": round(t_full_sel, 2)},
        "cpu_s_per_task": {"coarse_pair (affine + 2 SyN)": round(c_pair, 3),
                           "full_pair (affine + 2 SyN)": round(f_pair, 3),
                           "full_registration (one direction)": round(reg, 3)},
        "speedup_measured_wall": round(t_full_sel / (t_coarse_sel + t_fine), 2),
    })
    # extrapolation from per-task CPU: full all-to-all = N(N-1)/2 full pairs, then the target's
    # registrations are already done; coarse-first = N(N-1)/2 coarse pairs + (N-1) full registrations
    res["speedup_extrapolated_cpu"] = {
        str(m): round((m * (m - 1) / 2 * f_pair) / (m * (m - 1) / 2 * c_pair + (m - 1) * reg), 2)
        for m in [n] + a.extrapolate}
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _noop():
    import bids_app.group.tbss.register  # noqa: F401  (imports dipy in the worker)
    return None


if __name__ == "__main__":
    main()
