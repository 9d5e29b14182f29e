"""The machine a run gets: CPU threads, memory, and Numba's cache folder.

Called once by the command line before any heavy import (thread counts are read by BLAS and Numba
when they load), then by the workflows for the memory budget of tracking.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import Resources

GiB = 1 << 30


def limit_threads(res: Resources) -> None:
    """Thread counts for BLAS/OpenMP (``--omp-nthreads``, else ``--nthreads``) and Numba."""
    n = res.omp_nthreads or res.nthreads
    if n:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(n))
    if res.nthreads:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(min(res.nthreads, os.cpu_count() or 1)))


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def job_memory_limit() -> int | None:
    """The job's memory limit in bytes: cgroup (v2, v1) or SLURM's allocation; None if unlimited."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        v = _read_int(path)
        if v is not None and v < (1 << 60):        # v1 writes a huge number for "no limit"
            limits.append(v)
    per_node = os.environ.get("SLURM_MEM_PER_NODE")
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or "1"
    try:
        if per_node:
            limits.append(int(per_node) << 20)   # MB
        elif per_cpu:
            limits.append(int(per_cpu) * int(cpus) << 20)
    except ValueError:
        pass
    return min(limits) if limits else None


def memory_budget(res: Resources) -> int:
    """Bytes this run may use: ``--mem`` if given, else the smaller of the job's limit and the
    node's available memory."""
    if res.memory_bytes is not None:
        return res.memory_bytes
    from kernels.engine import available_memory  # not at import: numba must see the thread limits
    limit = job_memory_limit()
    avail = available_memory()
    return min(limit, avail) if limit else avail


def ensure_numba_cache_dir() -> None:
    """A writable Numba cache folder (see :func:`_writable_numba_cache_dir`), filled with the
    installation's prebuilt portable kernels when it has some (the container image does), so that
    a cold container does not compile them (:func:`kernels.warmup.use_prebuilt_cache`)."""
    _writable_numba_cache_dir()
    from kernels.warmup import use_prebuilt_cache   # standard library only: Numba is not loaded yet
    use_prebuilt_cache()


def _writable_numba_cache_dir() -> None:
    """Numba's cache must be writable or every cached kernel import fails; fall back to a private
    temporary folder (e.g. another user's /tmp/numba_cache on a shared cluster node)."""
    path = os.environ.get("NUMBA_CACHE_DIR")
    if path:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK | os.X_OK):
                return
        except OSError:
            pass
    elif os.access(Path.home(), os.W_OK):
        return  # numba's default (beside the package or in ~/.cache) is usable
    # a private folder that stays the same between runs, so kernels compile once per user and node
    mine = Path(tempfile.gettempdir()) / f"tractoscale-numba-{os.getuid()}"
    try:
        mine.mkdir(mode=0o700, exist_ok=True)
        st = mine.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(mine, os.W_OK | os.X_OK):
            os.environ["NUMBA_CACHE_DIR"] = str(mine)
            return
    except OSError:
        pass
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tractoscale-numba-")
