"""Benchmark: OT label transfer between N subject and M atlas fibres without an N x M matrix.

Fibres come from a brain-sized synthetic tractogram (80 random bundles, see
``bids_app.group.bundles.synthetic.random_bundles``); subject and atlas share the bundles but
draw their own fibres.  Reports wall time per stage, the fraction of fibre pairs the kernels
evaluate, label accuracy, and the process's peak resident memory next to what one dense
N x M float64 matrix would need (``--trace`` also reports the peak of Python/NumPy allocations
traced by tracemalloc; tracing slows the run down, so timings are then not comparable).

    python benchmarks/bench_segmentation.py --n 100000 --m 100000 [--device cpu|cuda] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="subject fibres (default 100000)")
    p.add_argument("--m", type=int, default=100_000, help="atlas fibres (default 100000)")
    p.add_argument("--bundles", type=int, default=80)
    p.add_argument("--clusters", type=int, default=None, help="K-means clusters (default: automatic)")
    p.add_argument("--blur", type=float, default=3.0)
    p.add_argument("--reach", type=float, default=20.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--trace", action="store_true", help="trace Python/NumPy allocations (slower)")
    a = p.parse_args(argv)
    if a.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(a.threads)

    import numpy as np

    from bids_app.group.bundles import fibres, ot, synthetic
    from kernels.sinkhorn import get_backend

    backend = get_backend(a.device)
    # compile (or load from cache) the kernels outside the timed region
    warm = np.zeros((2, 60))
    ot.transport_labels(warm, warm, np.zeros(2, np.int64), 1, ot.OTParams(), backend)
    import sklearn.cluster  # noqa: F401  (import time is not the solver's)

    if a.trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    xs, xl = synthetic.random_bundles(a.n, a.bundles, seed=1)
    ys, yl = synthetic.random_bundles(a.m, a.bundles, seed=2)
    X, Y = fibres.to_vectors(xs), fibres.to_vectors(ys)
    del xs, ys
    t_data = time.perf_counter() - t0
    params = ot.OTParams(blur=a.blur, reach=a.reach, n_clusters=a.clusters)
    t1 = time.perf_counter()
    res = ot.transport_labels(X, Y, yl, a.bundles, params, backend)
    t_ot = time.perf_counter() - t1
    traced_peak = tracemalloc.get_traced_memory()[1] if a.trace else None
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: kB
    out = {
        "n_subject": a.n, "n_atlas": a.m, "bundles": a.bundles, "device": backend.name,
        "threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)),
        "seconds_data": round(t_data, 2), "seconds_ot": round(t_ot, 2),
        "seconds_clustering": round(res.stats.get("cluster_seconds", 0.0), 2),
        "pair_fraction": res.stats["pair_fraction"], "pairs_per_call": res.stats["n_pairs"],
        "clusters": res.stats.get("clusters"),
        "kernel_calls": res.stats.get("kernel_calls"),
        "accuracy": float(np.mean(res.labels == xl)), "outliers": float(np.mean(res.labels < 0)),
        "peak_rss_MiB": round(rss_peak / 2 ** 20, 1),
        "peak_traced_python_MiB": None if traced_peak is None else round(traced_peak / 2 ** 20, 1),
        "dense_matrix_MiB": round(a.n * a.m * 8 / 2 ** 20, 1),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
