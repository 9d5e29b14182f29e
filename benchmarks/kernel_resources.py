"""Registers, stack and spills of every CUDA tracking build, from NVVM and ptxas (no GPU needed).

Compiles each specialisation of the tracking kernels (:mod:`kernels.cuda_tracker`) to PTX for a
compute capability (default sm_90, H100/H200) with the NVVM of ``numba-cuda[cu12]`` and assembles
it with the ``ptxas`` of the ``nvidia-cuda-nvcc-cu12`` wheel, then prints one row per kernel:

    python benchmarks/kernel_resources.py                 # the builds the tests check (11)
    python benchmarks/kernel_resources.py --all --readme  # every build; rewrites the README's table
    python benchmarks/kernel_resources.py --json out.json
    python benchmarks/kernel_resources.py --variants prob-sf-threshold-float32

Occupancy per SM is what the registers allow (65,536 per SM, 2,048 threads at most).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)   # the real CUDA front end, not the simulator
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

ALGOS = ("prob", "det", "ptt", "boot")
# every (algorithm, ODF mode) with threshold stopping in float32 (the GPU's default), the
# anatomical rules on the default algorithm, and the default in float64
DEFAULT_VARIANTS = tuple(f"{a}-{m}-threshold-float32" for a in ALGOS for m in ("sf", "sh")) + (
    "prob-sf-act-float32", "prob-sf-cmc-float32", "prob-sf-threshold-float64")
# every build a run can ask for: algorithm x ODF mode x stopping rule x precision
ALL_VARIANTS = tuple(f"{a}-{m}-{s}-{p}" for p in ("float32", "float64") for a in ALGOS
                     for m in ("sf", "sh") for s in ("threshold", "act", "cmc"))
README = ROOT / "README.md"
START, END = "<!-- kernel-resources:start -->", "<!-- kernel-resources:end -->"


def ptxas_path() -> Path | None:
    """ptxas from the nvidia-cuda-nvcc wheel, or None."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        return None
    exe = Path(list(spec.submodule_search_locations)[0]) / "bin" / "ptxas"
    return exe if exe.exists() else None


def example_data(algo: str, mode: str, stop: str, n_dwi: int = 64, sh_order: int = 8):
    """A small TrackingData with the shapes of a real run (724-direction sphere, SH order 8)."""
    from kernels.engine import BootstrapData, TrackParams, prepare
    shape = (6, 5, 4)
    rng = np.random.default_rng(0)
    sh = rng.normal(size=shape + ((sh_order + 1) * (sh_order + 2) // 2,)).astype(np.float32)
    sh[..., 0] = 3.0
    p = TrackParams(algorithm=algo, stop_method=stop)
    maps = dict(stop_map=np.ones(shape, np.float32)) if stop == "threshold" else dict(
        include_map=np.zeros(shape, np.float32), exclude_map=np.zeros(shape, np.float32))
    boot = None
    if algo == "boot":
        k = sh.shape[-1]
        boot = BootstrapData(bdata=np.ones(shape + (n_dwi + 1,), np.float32),
                             bootm=np.zeros((2 * n_dwi + 2 * k, n_dwi)), n_volumes=n_dwi, model="csa")
    return prepare(sh=sh, affine=np.eye(4), params=p, odf_mode=mode, bootstrap=boot, **maps)


def parse_ptxas(text: str) -> dict:
    """{kernel: {registers, stack, spill_stores, spill_loads}} from ``ptxas -v`` output."""
    res = {}
    for block in text.split("Compiling entry function")[1:]:
        name = re.search(r"'([^']+)'", block).group(1)
        props = block.split("Function properties for " + name)[-1] if ("Function properties for " + name) in block else block
        stack = re.search(r"(\d+) bytes stack frame", props)
        st = re.search(r"(\d+) bytes spill stores", props)
        ld = re.search(r"(\d+) bytes spill loads", props)
        regs = re.search(r"Used (\d+) registers", block)
        res[name] = dict(registers=int(regs.group(1)), stack=int(stack.group(1)),
                         spill_stores=int(st.group(1)), spill_loads=int(ld.group(1)))
    return res


def _without_gpu(cc) -> None:
    """Numba compiles device functions for the current GPU's compute capability: with no GPU
    (or driver) here, give it ``cc`` instead of asking a driver."""
    import types

    from kernels.device import real_gpu_available
    if real_gpu_available():
        return
    from numba.cuda import dispatcher
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)


_ASSEMBLED: dict = {}


def assemble(ptx: str, cc) -> dict:
    """``ptxas -v`` figures of one kernel's PTX (each distinct PTX assembled once)."""
    key = (hash(ptx), cc)
    if key in _ASSEMBLED:
        return _ASSEMBLED[key]
    ptxas = ptxas_path()
    if ptxas is None:
        raise RuntimeError("no ptxas: pip install numba-cuda[cu12]")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(src), "-o",
                               str(src.with_suffix(".cubin"))], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    entry = re.search(r"\.visible \.entry (\S+)\(", ptx).group(1)
    r = dict(parse_ptxas(proc.stderr)[entry])
    r["f64_ops"] = len(re.findall(r"\b(?:add|sub|mul|fma|div)\.(?:rn\.)?f64\b", ptx))
    r["f32_ops"] = len(re.findall(r"\b(?:add|sub|mul|fma|div)\.(?:rn\.|full\.)?f32\b", ptx))
    r["occupancy_warps"] = occupancy(r["registers"]) // 32
    _ASSEMBLED[key] = r
    return r


def resources(variant_name: str, cc=(9, 0)) -> dict:
    """``{kernel name: figures}`` of one build, e.g. ``prob-sf-threshold-float32``."""
    from kernels.cuda_tracker import Variant, compile_ptx
    _without_gpu(cc)
    algo, mode, stop, precision = variant_name.split("-")
    data = example_data(algo, mode, stop)
    variant = Variant.of(data, precision)
    return {name: assemble(text, cc) for name, text in compile_ptx(data, variant, cc=cc).items()}


def occupancy(regs: int) -> int:
    """Resident threads per SM allowed by the registers (sm_90: 64K registers, 2048 threads)."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(2048, (65536 // per_warp) * 32)


def table(rows: list[dict], cc, seconds: float) -> str:
    """Markdown table, one row per kernel of each build; a peak / join / packing kernel identical
    to one of an earlier build (same name and figures) is listed once."""
    out = ["| build | kernel | registers | stack (B) | spills (B) | warps/SM | f32 / f64 ops |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    seen = set()
    for r in rows:
        key = (r["kernel"], r["registers"], r["stack"], r["f32_ops"], r["f64_ops"])
        if r["kernel"] != "track_tasks_cuda" and key in seen:
            continue
        seen.add(key)
        out.append(f"| {r['variant']} | {r['kernel']} | {r['registers']} | {r['stack']} | "
                   f"{r['spill_stores'] + r['spill_loads']} | {r['occupancy_warps']} | "
                   f"{r['f32_ops']} / {r['f64_ops']} |")
    import numba
    import numba_cuda
    builds = len({r["variant"] for r in rows})
    out += ["", f"{builds} builds for sm_{cc[0]}{cc[1]} (Numba {numba.__version__}, numba-cuda "
            f"{numba_cuda.__version__}, ptxas of nvidia-cuda-nvcc-cu12 {_nvcc_version()}), "
            f"{seconds:.0f} s to compile; regenerate with `python benchmarks/kernel_resources.py --all --readme`."]
    return "\n".join(out)


def _nvcc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nvidia-cuda-nvcc-cu12")
    except PackageNotFoundError:
        return "?"


def write_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + START + "\n" + text + "\n" + END + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=None,
                   help="ALGO-MODE-STOP-PRECISION, e.g. prob-sf-threshold-float32 (default: the 11 tested builds)")
    p.add_argument("--all", action="store_true", help=f"every build ({len(ALL_VARIANTS)})")
    p.add_argument("--cc", default="9.0", help="compute capability (default 9.0)")
    p.add_argument("--json", type=Path)
    p.add_argument("--readme", action="store_true", help="write the table into README.md between its markers")
    a = p.parse_args(argv)
    variants = ALL_VARIANTS if a.all else (a.variants or list(DEFAULT_VARIANTS))
    cc = tuple(int(x) for x in a.cc.split("."))
    t0 = time.perf_counter()
    rows = []
    for v in variants:
        for name, k in resources(v, cc).items():
            rows.append(dict(variant=v, kernel=name, **k))
        print(f"{v}: " + ", ".join(f"{r['kernel']} {r['registers']} regs / {r['stack']} B"
                                   for r in rows if r["variant"] == v), file=sys.stderr, flush=True)
    text = table(rows, cc, time.perf_counter() - t0)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    if a.readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
