"""Start-up: seconds of Numba compilation in a participant run, cold, warm, and cold with the
portable prebuilt cache that the container image carries.

Each run is a fresh process on the small demo subject (``tractoscale bids out participant``),
with its own ``NUMBA_CACHE_DIR``:

* ``cold``: an empty cache folder, host CPU (a first run outside the image);
* ``warm``: the same folder again (every later run on that machine);
* ``prebuilt``: an empty cache folder, but a portable cache built beforehand with
  ``python -m kernels.warmup --portable DIR`` (what the image's build step does) is found and
  copied in, Numba's CPU set to ``generic`` -- a new container on a new host.

Compilation time is the time Numba spends in its ``numba:compile`` events (a cache hit raises
none), outermost events only; "to tracking" is the time from start until the tracking stage
starts (its first log line).

    python benchmarks/bench_startup.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = r"""
import json, logging, sys, time
t_start = time.perf_counter()
marks = {}
class Mark(logging.Handler):
    def emit(self, record):
        if "tracking" in record.getMessage() and "tracking" not in marks:
            marks["tracking"] = time.perf_counter() - t_start
logging.getLogger("bids_app.tracking").setLevel(logging.INFO)
logging.getLogger("bids_app.tracking").addHandler(Mark())
from bids_app.resources import ensure_numba_cache_dir
ensure_numba_cache_dir()
from numba.core import event
spans, depth = [], [0]
class Listener(event.Listener):
    def on_start(self, ev):
        if depth[0] == 0:
            spans.append([time.perf_counter(), None, str(ev.data.get("dispatcher", ""))[:60]])
        depth[0] += 1
    def on_end(self, ev):
        depth[0] -= 1
        if depth[0] == 0:
            spans[-1][1] = time.perf_counter()
event.register("numba:compile", Listener())
from bids_app.cli import run
code = run(sys.argv[1:])
out = dict(code=code, seconds=time.perf_counter() - t_start, to_tracking=marks.get("tracking"),
           compile_seconds=sum(e - s for s, e, _ in spans if e), compiled=len(spans),
           cpu_name=__import__("os").environ.get("NUMBA_CPU_NAME", "host"))
print("STARTUP " + json.dumps(out))
"""


def run_once(bids: Path, out: Path, cache: Path, prebuilt: Path | None, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_") and k != "TRACTOSCALE_NUMBA_PREBUILT"}
    env.update(NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    # no prebuilt cache unless asked: point the lookup at a folder that does not exist
    env["TRACTOSCALE_NUMBA_PREBUILT"] = str(prebuilt) if prebuilt else str(cache / "no-prebuilt")
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(bids), str(out), "participant",
                           "--skip-bids-validation", "--no-progress", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line[-1][8:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=["--odf-model", "csa", "--nthreads", "2"],
                   help="options for the participant runs (default: --odf-model csa --nthreads 2)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        tmp = Path(tmp)
        bids = tmp / "bids"
        subprocess.run([sys.executable, "-m", "bids_app.cli", "demo-data", str(bids), "--subjects", "1",
                        "--size", "small"], check=True, cwd=ROOT, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        t0 = time.perf_counter()
        from kernels.warmup import build_portable_cache  # noqa: E402  (after the demo data)
        sys.path.insert(0, str(ROOT))
        build_portable_cache(tmp / "prebuilt")
        t_build = time.perf_counter() - t0
        rows = [("cold (empty cache, host CPU)", run_once(bids, tmp / "o1", tmp / "c1", None, a.extra)),
                ("warm (same cache again)", run_once(bids, tmp / "o2", tmp / "c1", None, a.extra)),
                ("prebuilt (empty cache + portable cache)", run_once(bids, tmp / "o3", tmp / "c3",
                                                                     tmp / "prebuilt", a.extra))]
    load = os.getloadavg()[0]
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load:.1f}; portable cache built in {t_build:.0f} s")
    print(f"{'run':42s} {'compile s':>10s} {'compiled':>9s} {'to tracking s':>14s} {'total s':>8s} {'CPU':>8s}")
    for name, r in rows:
        tt = f"{r['to_tracking']:.1f}" if r["to_tracking"] is not None else "n/a"
        print(f"{name:42s} {r['compile_seconds']:10.1f} {r['compiled']:9d} {tt:>14s} {r['seconds']:8.1f} "
              f"{r['cpu_name']:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
