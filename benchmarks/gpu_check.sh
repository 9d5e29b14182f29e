#!/usr/bin/env bash
# The GPU check (issue 12): CUDA-vs-CPU parity on the demo subject, CUDA start-up cold and warm,
# and tractoscale CUDA against GPUStreamlines (cuslines) on the same ODFs and seeds, in seeds/s.
#
# Made for a lent GPU machine with no network (see the device tool's README): the Python
# packages it lacks travel as wheels in .whl/ (ignored by git), fetched beforehand on a machine
# with pip access:
#
#   benchmarks/gpu_check.sh fetch        # here: downloads the wheels into .whl/ (~14 MB)
#   benchmarks/gpu_check.sh run          # there (carry .whl): installs them, runs, < 8 minutes
#
# With the device tool:  run(command="bash benchmarks/gpu_check.sh run", carry=[".whl"],
# timeout_s=540).  Results: the summary at the end of the output, the full record in
# $OUT/gpu_check.json and the log in $OUT/gpu_check.log.  Sizes: GPU_CHECK_SEEDS (500000),
# GPU_CHECK_SIZE (full), GPU_CHECK_STEP (0.5 mm).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE="${1:-run}"
WHEELS=(cuslines==2.2.3 dipy==1.12.1 nibabel==5.4.2 trx-python==0.6)

if [ "$MODE" = fetch ]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    du -sh .whl
    exit 0
fi
[ "$MODE" = run ] || { echo "usage: $0 fetch|run" >&2; exit 64; }

OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -5
python3 --version
python3 -m pip list 2>/dev/null | grep -i -E "^(numba|numba-cuda|numpy|llvmlite|cuda-python|cuda-bindings|cuda-core|scipy|h5py|tqdm) " || true
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: wheel install failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check: no wheels in .whl/ (run '$0 fetch' where pip works, and carry .whl)" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/gpu_check_numba_cache CUDA_CACHE_PATH=/tmp/cuda_jit_cache
unset NUMBA_ENABLE_CUDASIM
rm -rf "$NUMBA_CACHE_DIR"
timeout 450 python3 benchmarks/gpu_check.py --out "$OUT" --size "${GPU_CHECK_SIZE:-full}" \
    --n-seeds "${GPU_CHECK_SEEDS:-500000}" --step "${GPU_CHECK_STEP:-0.5}"
rc=$?
[ $rc = 124 ] && echo "gpu_check: stopped at its 450 s limit (partial results above)"
exit $rc
