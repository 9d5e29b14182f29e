"""The machine a run gets: CPU threads, memory, Numba's cache folder, and a clean import path.

Called once by the command line before any heavy import (thread counts are read by BLAS and Numba
when they load), then by the workflows for the memory budget of tracking.
"""
from __future__ import annotations

import atexit
import os
import shutil
import stat
import sys
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


def resident_bytes() -> int:
    """This process's resident memory now (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def remaining_budget(res: Resources) -> int:
    """What is left of :func:`memory_budget` given what this process already holds (at least
    256 MiB): the budget a step that allocates on top of the current arrays may use."""
    return max(memory_budget(res) - resident_bytes(), 256 << 20)


def private_dir_problem(path: Path | str) -> str | None:
    """Why ``path`` is not a folder only this user can change, or None if it is.

    The folder itself (``lstat``: a symbolic link is refused) must be a directory owned by this user
    and not writable by group or others.  Every folder above it (on its resolved path) must belong to
    root or to this user and, if others may write in it, carry the sticky bit (like ``/tmp``), so
    nobody else can rename or replace any level of the path.
    """
    path = Path(path)
    uid = os.getuid()
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_uid != uid:
        return f"{path} belongs to uid {st.st_uid}, not to this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (chmod go-w to fix)"
    for parent in Path(os.path.realpath(path)).parents:
        try:
            pst = os.stat(parent)
        except OSError as exc:
            return f"cannot inspect {parent}: {exc.strerror}"
        if pst.st_uid not in (0, uid):
            return f"{parent} belongs to uid {pst.st_uid}, who could replace {path}"
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return f"{parent} is writable by others without the sticky bit; {path} could be replaced"
    return None


def make_private_dir(path: Path | str) -> str | None:
    """Create ``path`` level by level with mode 0700 (whatever the umask) and check it with
    :func:`private_dir_problem`; return what is wrong, or None when it is safe to use."""
    path = Path(os.path.abspath(path))
    missing = []
    for level in [path, *path.parents]:
        if os.path.lexists(level):
            break
        missing.append(level)
    for level in reversed(missing):
        try:
            os.mkdir(level, 0o700)
        except FileExistsError:
            pass             # made by someone else meanwhile: the check below decides
        except OSError as exc:
            return f"cannot create {level}: {exc.strerror}"
    return private_dir_problem(path)


# Why the Numba cache is where it is: logged by the CLI once logging is set up.
numba_cache_note: str | None = None


def ensure_numba_cache_dir() -> Path:
    """Point ``NUMBA_CACHE_DIR`` at a folder only this user can write, before numba is imported.

    Numba unpickles its cache index files, so a cache folder that someone else can write (a shared
    ``/tmp/numba_cache`` under Apptainer, a link swapped in after a check) runs their code as you.
    In order: ``NUMBA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/tractoscale/numba``; then ``<tmp>/tractoscale-numba-<uid>`` (kernels still compile once per
    user and node); else a fresh private temporary folder, removed at exit.  Each is used only if
    :func:`make_private_dir` accepts it, and the variable is set to its resolved path; the folder is
    then filled with the installation's prebuilt kernels (:func:`kernels.warmup.use_prebuilt_cache`).
    """
    global numba_cache_note
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        candidates = [Path(given)]
    else:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        candidates = [Path(cache_home) / "tractoscale" / "numba"]
    candidates.append(Path(tempfile.gettempdir()) / f"tractoscale-numba-{os.getuid()}")
    problems, kept = [], True
    for cand in candidates:
        problem = make_private_dir(cand)
        if problem is None:
            chosen = Path(os.path.realpath(cand))
            break
        problems.append(problem)
    else:
        chosen, kept = Path(tempfile.mkdtemp(prefix="tractoscale-numba-")), False
        atexit.register(shutil.rmtree, chosen, ignore_errors=True)
    if problems:
        numba_cache_note = (f"Numba cache in {chosen}, not in {candidates[0]}: {'; '.join(problems)}"
                            + ("" if kept else " (a temporary folder: kernels compile again at each run)"))
    os.environ["NUMBA_CACHE_DIR"] = str(chosen)
    # the installation's prebuilt portable CPU kernels (the container image has some), so that a cold
    # container does not compile them; standard library only: Numba is not loaded yet
    from kernels.warmup import use_prebuilt_cache
    use_prebuilt_cache()
    return chosen


def isolate_imports() -> None:
    """No code may be imported from the working directory (it may be the input dataset, with a
    planted ``numpy.py``): drop it, and any relative entry, from ``sys.path`` and ``PYTHONPATH``
    (an empty entry, as in ``PYTHONPATH=:/opt/lib``, means the working directory), and make every
    Python child process (joblib and multiprocessing workers) start without it (``PYTHONSAFEPATH``)."""
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:      # the working directory was removed: nothing to import from it
        cwd = None

    def safe(entry: str) -> bool:
        return os.path.isabs(entry) and os.path.realpath(entry) != cwd

    sys.path[:] = [p for p in sys.path if safe(p)]
    if "PYTHONPATH" in os.environ:
        kept = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if safe(p)]
        if kept:
            os.environ["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del os.environ["PYTHONPATH"]
