"""Time and peak memory of the participant level, stage by stage, on an HCP-sized subject.

    python benchmarks/bench_participant.py                    # writes the HCP-sized demo once (.bench/hcp)
    python benchmarks/bench_participant.py BIDS_DIR --participant-label 01 --nthreads 2
    python benchmarks/bench_participant.py --runs 2           # run 1 compiles (fresh Numba cache), run 2 warm

Runs the real command line (``tractoscale BIDS OUT participant ...``) and samples the resident
memory of its whole process tree (the app and any worker processes) every 0.2 s.  The stages'
completion records give each stage's start and end, hence its time and its peak memory.  Extra
arguments after ``--`` go to tractoscale (e.g. ``-- --odf-model csa --tracking det``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.done = pid, every, [], False

    def run(self):
        while not self.done:
            self.samples.append((time.time(), tree_rss(self.pid)))
            time.sleep(self.every)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((m for t, m in self.samples if start <= t <= end), default=0)


def make_hcp_demo(path: Path) -> Path:
    if not (path / "dataset_description.json").exists():
        print(f"writing the HCP-sized demo subject to {path} (a few minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "bids_app.cli", "demo-data", str(path), "--subjects", "1",
                        "--size", "hcp"], check=True, cwd=ROOT)
    return path


def stage_times(out: Path, label: str) -> list[tuple[str, float, float, float]]:
    """(stage, start, end, seconds): start and end in epoch seconds, from the completion records."""
    rows = []
    for rec_path in sorted(out.glob(f"{label}/**/.stages/*.json")):
        rec = json.loads(rec_path.read_text())
        end = datetime.strptime(rec["finished"], "%Y-%m-%dT%H:%M:%S").timestamp() + 1.0
        rows.append((rec["stage"].removeprefix(label + "_"), end - 1.0 - rec["seconds"], end, rec["seconds"]))
    return [(name, start, end, secs) for name, start, end, secs in sorted(rows, key=lambda r: r[1])]


def run_once(bids: Path, out: Path, args, extra, env) -> dict:
    cmd = [sys.executable, "-m", "bids_app.cli", str(bids), str(out), "participant", "--participant-label",
           args.participant_label, "--nthreads", str(args.nthreads), "--skip-bids-validation", "-v",
           "--no-progress", "--force", *extra]
    t0 = time.time()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid)
    sampler.start()
    code = proc.wait()
    sampler.done = True
    sampler.join()
    wall = time.time() - t0
    log.close()
    if code != 0:
        raise SystemExit(f"tractoscale exited {code}; see {out.parent / (out.name + '.log')}")
    stages = [{"stage": name, "seconds": secs, "peak_gb": sampler.peak(start, end) / GiB}
              for name, start, end, secs in stage_times(out, f"sub-{args.participant_label}")]
    return {"wall_s": wall, "peak_gb": sampler.peak() / GiB, "stages": stages}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bids_dir", nargs="?", type=Path, help="default: the HCP-sized demo in .bench/hcp")
    p.add_argument("--participant-label", default="01")
    p.add_argument("--nthreads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="run 1 with an empty Numba cache, the others warm")
    p.add_argument("--work", type=Path, default=None, help="output folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    bids = args.bids_dir or make_hcp_demo(ROOT / ".bench" / "hcp")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_participant_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="bench_numba_"))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    results = []
    try:
        for r in range(args.runs):
            res = run_once(bids, work / f"run{r + 1}", args, extra, env)
            res["run"] = "first (compiling)" if r == 0 else "warm"
            results.append(res)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n{bids} sub-{args.participant_label}, --nthreads {args.nthreads} {' '.join(extra)}; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end")
    for res in results:
        print(f"\n{res['run']}: {res['wall_s']:.0f} s, peak {res['peak_gb']:.2f} GB (whole process tree)\n")
        print("| stage | seconds | peak memory (GB) |\n| --- | ---: | ---: |")
        for s in res["stages"]:
            print(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_gb']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
