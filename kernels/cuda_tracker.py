"""The tracking functions compiled for CUDA: specialised builds, a pipeline over chunks, several GPUs.

Import only when CUDA (or the simulator) is wanted.

**Builds.** One build per (algorithm, ODF mode, stopping rule, precision, array sizes) actually
used, made by :func:`kernels.compile.compile_for` from the one source in
:mod:`kernels.tracking_core` with its build constants fixed: the compiler drops the code of every
other algorithm and rule, per-thread arrays are as large as this run needs (the cone's candidates,
not the whole sphere, for probabilistic tracking), and the arithmetic is float32 unless float64
is asked for.  Seed-peak finding is its own kernel (it needs a whole-sphere PMF, propagation does
not).  Kernels are cached on disk (``NUMBA_CACHE_DIR``), keyed to their source and constants.

**Work.** Per chunk of seeds: the peak kernel (one thread per seed), the propagation kernel
(persistent threads taking half streamlines from an atomic counter, so a long streamline holds up
one thread, not a warp or a block), a kernel joining the halves, and one packing the kept points,
of which only those are copied back.  Two CUDA streams and pinned host buffers let a chunk's
copy-back overlap the next chunk's tracking; with several GPUs, chunks go round-robin to one
worker thread per GPU and come back in order, so the tractogram is the same as on one GPU.
"""
from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from numba import cuda

from . import tracking_core as _core
from .compile import compile_for
from .device import cudasim_enabled

THREADS_PER_BLOCK = 128
_SEED_KERNELS = (_core.seed_directions_cuda,)
_TASK_KERNELS = (_core.track_tasks_cuda,)
_FINISH_KERNELS = (_core.join_slots_cuda, _core.gather_joined_cuda)
_BUILDS: dict = {}
_BUILD_LOCK = threading.Lock()
# the simulator runs a kernel by swapping the ``cuda`` global of its namespace: one at a time
_SIM_LOCK = threading.Lock()

PRECISIONS = ("float32", "float64")


@dataclass(frozen=True)
class Variant:
    """What a build is specialised for (all compile-time constants)."""

    algorithm: int
    odf_mode: int
    stop: int
    precision: str
    n_verts: int
    cone_width: int      # candidate vertices of a cone (probabilistic tracking's CDF)
    n_coef: int          # SH coefficients evaluated on the fly (sh mode, bootstrap), else 0
    n_dwi: int           # bootstrap volumes, else 0

    @classmethod
    def of(cls, data, precision: str = "float32") -> "Variant":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        ip = data.ip
        algo = int(ip[_core.I_ALGORITHM])
        mode = int(ip[_core.I_ODF_MODE])
        n_coef = 0
        if algo == _core.ALGO_BOOT:
            n_coef = int(ip[_core.I_N_SH_COEF])
        elif mode == _core.ODF_SH:
            n_coef = int(ip[_core.I_N_ODF_COEF])
        return cls(algorithm=algo, odf_mode=mode, stop=int(ip[_core.I_STOP_METHOD]), precision=precision,
                   n_verts=int(ip[_core.I_N_VERTS]),
                   cone_width=int(data.nbrs.shape[1] - ip[_core.I_NBR_DEGREE]), n_coef=n_coef,
                   n_dwi=int(ip[_core.I_BOOT_N_DWI]) if algo == _core.ALGO_BOOT else 0)

    @property
    def real(self):
        return np.float32 if self.precision == "float32" else np.float64

    def constants(self, build: str) -> dict:
        """Build constants of the ``seed`` (peak finding), ``task`` (propagation) or ``finish``
        (joining, packing) kernels; a setting a build does not use stays generic, so builds that
        differ only there are one build (and one cache entry)."""
        c = {"SPEC_ALGORITHM": -1, "SPEC_ODF_MODE": -1, "SPEC_STOP": self.stop,
             **_core.precision_constants(self.real)}
        if build == "finish":
            return c
        c["SPEC_ODF_MODE"] = self.odf_mode
        if build == "seed":
            pmf = self.n_verts
            coef = self.n_coef if self.odf_mode == _core.ODF_SH else 1
            work = 1
        else:
            c["SPEC_ALGORITHM"] = self.algorithm
            pmf = self.cone_width if self.algorithm == _core.ALGO_PROB else (
                1 if self.algorithm == _core.ALGO_PTT else self.n_verts)
            coef = max(self.n_coef, 1) if self.algorithm != _core.ALGO_PTT else 1
            work = (9 if self.algorithm == _core.ALGO_PTT else
                    _core.WORK_HEAD + 3 * self.n_dwi if self.algorithm == _core.ALGO_BOOT else 1)
        c.update(LOCAL_PMF=max(int(pmf), 1), LOCAL_COEF=max(int(coef), 1), LOCAL_WORK=max(int(work), 1))
        return c

    @property
    def name(self) -> str:
        algo = {v: k for k, v in (("prob", 0), ("det", 1), ("ptt", 2), ("boot", 3))}[self.algorithm]
        stop = ("threshold", "act", "cmc")[self.stop]
        return f"{algo}-{('sf', 'sh')[self.odf_mode]}-{stop}-{self.precision}"


@dataclass(frozen=True)
class Kernels:
    seed: object
    tasks: object
    join: object
    gather: object


def _build(kernels, constants: dict) -> dict:
    key = (tuple(k.__name__ for k in kernels), tuple(sorted((k, repr(v)) for k, v in constants.items())))
    if key not in _BUILDS:
        _BUILDS[key] = compile_for("cuda", device=_core.DEVICE_FUNCTIONS, kernels=kernels, constants=constants)
    return _BUILDS[key]


def kernels_for(variant: Variant) -> Kernels:
    """The CUDA kernels of one variant, compiled on first launch (or loaded from the disk cache)."""
    with _BUILD_LOCK:
        seed = _build(_SEED_KERNELS, variant.constants("seed"))
        task = _build(_TASK_KERNELS, variant.constants("task"))
        fin = _build(_FINISH_KERNELS, variant.constants("finish"))
        return Kernels(seed=seed["seed_directions_cuda"], tasks=task["track_tasks_cuda"],
                       join=fin["join_slots_cuda"], gather=fin["gather_joined_cuda"])


def _blocks(n: int, tpb: int = THREADS_PER_BLOCK) -> int:
    return max(1, (n + tpb - 1) // tpb)


def host_arrays(data, real) -> tuple:
    """The read-only kernel inputs in the build's precision (ODF table and maps keep their types)."""
    r = np.dtype(real)
    return (*data.odf_arrays, data.bmat, data.verts.astype(r), data.nbrs, data.stop,
            data.affine.astype(r), data.fp.astype(r), data.ip, data.bdata, data.bootm.astype(r))


def gpu_ids(requested=None) -> list[int]:
    """GPU numbers to use: ``None``/``"all"``: every visible GPU; else a list (or "0,2")."""
    n = len(cuda.gpus)
    if requested is None or requested == "all":
        return list(range(max(n, 1)))
    if isinstance(requested, str):
        requested = [int(x) for x in requested.split(",") if x.strip()]
    ids = [int(x) for x in requested]
    bad = [g for g in ids if g < 0 or g >= max(n, 1)]
    if bad or not ids:
        raise ValueError(f"GPU numbers {ids} are not all among the {n} visible GPU(s)")
    return ids


class _Gpu:
    """One GPU's copy of the inputs, its two streams and pinned buffers."""

    def __init__(self, device_id: int, data, variant: Variant, kernels: Kernels):
        self.device_id = device_id
        self.kernels = kernels
        self.real = variant.real
        self.max_pts = int(data.params.max_points)
        self.max_cross = int(data.params.max_cross)
        self.min_pts = int(data.params.min_points)
        self.sim = cudasim_enabled()
        if not self.sim:
            cuda.select_device(device_id)
            sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
            self.task_grid = (sms * (2048 // THREADS_PER_BLOCK), THREADS_PER_BLOCK)
        else:
            self.task_grid = (2, 8)   # the simulator runs each thread as a Python thread
        host = host_arrays(data, self.real)
        self.inputs = tuple(cuda.to_device(np.ascontiguousarray(a)) for a in host)
        self.streams = [cuda.stream(), cuda.stream()]
        self._pinned: dict = {}
        self._submitted = 0     # this GPU's chunks so far: chunk j uses stream and buffers j % 2

    def _pin(self, key, shape, dtype):
        buf = self._pinned.get(key)
        if buf is None or buf.dtype != np.dtype(dtype) or buf.size < int(np.prod(shape)):
            n = int(np.prod(shape) * 1.25) + 1024
            buf = cuda.pinned_array(n, dtype=dtype)
            self._pinned[key] = buf
        return buf[:int(np.prod(shape))].reshape(shape)

    def _launch(self, kernel, grid, block, stream, *args):
        with warnings.catch_warnings():
            # the simulator runs the kernels on numpy scalars, whose uint64 hash arithmetic wraps
            # around on purpose
            warnings.simplefilter("ignore", RuntimeWarning)
            if self.sim:
                with _SIM_LOCK:
                    kernel[grid, block, stream](*args)
            else:
                kernel[grid, block, stream](*args)

    def submit(self, first: int, seeds_vox: np.ndarray) -> dict:
        """Queue a chunk's work on the next of the two streams: peaks, propagation, joining, and
        the copy-back of its streamlines' lengths.  A stream's buffers are reused two chunks
        later, after :meth:`finish` has waited for it."""
        k = self._submitted
        self._submitted += 1
        st = self.streams[k % 2]
        n = len(seeds_vox)
        n_slots = n * self.max_cross
        n_tasks = 2 * n_slots
        h_seeds = self._pin(("seeds", k % 2), (n, 3), self.real)
        h_seeds[:] = seeds_vox
        (vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm) = self.inputs
        d_seeds = cuda.to_device(h_seeds, stream=st)
        d_peaks = cuda.device_array((n, self.max_cross), dtype=np.int32, stream=st)
        d_npk = cuda.device_array(n, dtype=np.int32, stream=st)
        self._launch(self.kernels.seed, _blocks(n), THREADS_PER_BLOCK, st, d_seeds, np.int64(first),
                     vidx, sf, shc, oscale, bmat, verts, nbrs, stop, fp, ip, d_peaks, d_npk)
        d_out = cuda.device_array((n_tasks, self.max_pts, 3), dtype=np.float32, stream=st)
        d_n = cuda.device_array(n_tasks, dtype=np.int32, stream=st)
        d_st = cuda.device_array(n_tasks, dtype=np.int32, stream=st)
        d_counter = cuda.to_device(np.zeros(1, dtype=np.int32), stream=st)
        grid, block = self.task_grid
        grid = min(grid, _blocks(n_tasks, block))
        self._launch(self.kernels.tasks, grid, block, st, d_seeds, np.int64(first), d_peaks, d_npk,
                     vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm,
                     d_out, d_n, d_st, d_counter)
        d_len = cuda.device_array(n_slots, dtype=np.int32, stream=st)
        self._launch(self.kernels.join, _blocks(n_slots), THREADS_PER_BLOCK, st, d_n, d_st, ip, d_len)
        h_len = self._pin(("len", k % 2), (n_slots,), np.int32)
        d_len.copy_to_host(h_len, stream=st)
        return dict(k=k, stream=st, out=d_out, n=d_n, lengths=h_len)

    def finish(self, job: dict):
        """Wait for a chunk; pack its kept streamlines on the GPU and copy back only their points."""
        st = job["stream"]
        st.synchronize()
        lengths_all = np.array(job["lengths"])
        slots = np.flatnonzero(lengths_all >= self.min_pts).astype(np.int64)
        lengths = lengths_all[slots].astype(np.int64)
        offsets = np.zeros(len(slots), dtype=np.int64)
        if len(slots) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        total = int(lengths.sum())
        if total == 0:
            return np.zeros((0, 3), np.float32), lengths, slots
        d_pos = cuda.device_array((total, 3), dtype=np.float32, stream=st)
        self._launch(self.kernels.gather, _blocks(len(slots)), THREADS_PER_BLOCK, st, job["out"], job["n"],
                     cuda.to_device(slots, stream=st), cuda.to_device(offsets, stream=st),
                     cuda.to_device(lengths, stream=st), d_pos)
        h_pos = self._pin(("pos", job["k"] % 2), (total, 3), np.float32)
        d_pos.copy_to_host(h_pos, stream=st)
        st.synchronize()
        return np.array(h_pos), lengths, slots


class CudaRunner:
    """Tracks chunks of seeds on one or more GPUs; results come back in chunk order."""

    def __init__(self, data, gpus=None, precision: str = "float32"):
        self.data = data
        self.variant = Variant.of(data, precision)
        self.kernels = kernels_for(self.variant)
        self.gpu_ids = gpu_ids(gpus)
        self.chunks_per_gpu = {g: 0 for g in range(len(self.gpu_ids))}
        self._gpus: dict = {}

    def _gpu(self, w: int) -> _Gpu:
        if w not in self._gpus:
            self._gpus[w] = _Gpu(self.gpu_ids[w], self.data, self.variant, self.kernels)
        return self._gpus[w]

    def free_memory(self) -> int:
        try:
            free, _total = cuda.current_context().get_memory_info()
            return int(free)
        except Exception:
            return 1 << 30

    def run(self, seeds_vox: np.ndarray, first_index: int):
        """One chunk, synchronously, on the first GPU."""
        gpu = self._gpu(0)
        return gpu.finish(gpu.submit(first_index, seeds_vox))

    def stream(self, chunks):
        """Track ``(first_index, seeds_vox)`` chunks; yields ``(first, seeds, (positions, lengths,
        slots))`` in the order given.  Each GPU has its own worker thread and overlaps a chunk's
        copy-back with the next chunk's tracking."""
        n = len(self.gpu_ids)
        if n == 1 and cudasim_enabled():
            for first, seeds in chunks:       # the simulator gains nothing from threads
                yield first, seeds, self.run(seeds, first)
            return
        inboxes = [queue.Queue(maxsize=2) for _ in range(n)]
        results: dict = {}
        cond = threading.Condition()
        errors: list = []

        def worker(w: int):
            try:
                gpu = self._gpu(w)
                pending = None
                while True:
                    item = inboxes[w].get()
                    job = None
                    if item is not None:
                        idx, first, seeds = item
                        job = (idx, gpu.submit(first, seeds))
                    if pending is not None:
                        res = gpu.finish(pending[1])
                        with cond:
                            results[pending[0]] = res
                            cond.notify_all()
                    pending = job
                    if item is None:
                        return
            except BaseException as exc:  # handed to the consumer
                with cond:
                    errors.append(exc)
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(w,), daemon=True, name=f"tractoscale-gpu{w}")
                   for w in range(n)]
        for t in threads:
            t.start()
        order: list = []
        try:
            it = iter(chunks)
            idx = 0
            done = 0
            exhausted = False
            while True:
                # keep every GPU fed (two chunks ahead each) while results come back in order
                while not exhausted and idx - done < 2 * n:
                    try:
                        first, seeds = next(it)
                    except StopIteration:
                        exhausted = True
                        for box in inboxes:
                            box.put(None)
                        break
                    order.append((first, seeds))
                    self.chunks_per_gpu[idx % n] += 1
                    inboxes[idx % n].put((idx, first, seeds))
                    idx += 1
                if done == idx and exhausted:
                    break
                with cond:
                    while done not in results and not errors:
                        cond.wait()
                    if errors:
                        raise errors[0]
                    res = results.pop(done)
                first, seeds = order[done]
                order[done] = None
                done += 1
                yield first, seeds, res
        finally:
            if not exhausted:
                for box in inboxes:
                    try:
                        box.put_nowait(None)
                    except queue.Full:
                        pass


# ----------------------------------------------------------------------------- inspection
def kernel_signatures(data, variant: Variant) -> dict:
    """Numba signatures of the variant's kernels for ``data`` (to compile them without a GPU)."""
    from numba import typeof, types
    real = types.float32 if variant.precision == "float32" else types.float64
    ins = tuple(typeof(np.ascontiguousarray(a)) for a in host_arrays(data, variant.real))
    vidx, sf, shc, oscale, bmat, verts, nbrs, stop, aff, fp, ip, bdata, bootm = ins
    seeds = types.Array(real, 2, "C")
    i32 = types.Array(types.int32, 1, "C")
    i64 = types.Array(types.int64, 1, "C")
    peaks = types.Array(types.int32, 2, "C")
    out = types.Array(types.float32, 3, "C")
    return {
        "seed_directions_cuda": (seeds, types.int64, vidx, sf, shc, oscale, bmat, verts, nbrs, stop, fp, ip,
                                 peaks, i32),
        "track_tasks_cuda": (seeds, types.int64, peaks, i32, *ins, out, i32, i32, i32),
        "join_slots_cuda": (i32, i32, ip, i32),
        "gather_joined_cuda": (out, i32, i64, i64, i64, types.Array(types.float32, 2, "C")),
    }


_PTX: dict = {}


def compile_ptx(data, variant: Variant, cc=(9, 0)) -> dict:
    """``{kernel name: PTX}`` of the variant for compute capability ``cc``: NVVM only, no GPU.
    A kernel shared with an earlier variant (same build, same signature) is compiled once."""
    k = kernels_for(variant)
    funcs = {"seed_directions_cuda": k.seed, "track_tasks_cuda": k.tasks, "join_slots_cuda": k.join,
             "gather_joined_cuda": k.gather}
    out = {}
    for name, sig in kernel_signatures(data, variant).items():
        key = (funcs[name].py_func.__qualname__, sig, cc)
        if key not in _PTX:
            _PTX[key] = cuda.compile_ptx(funcs[name].py_func, sig, cc=cc)[0]
        out[name] = _PTX[key]
    return out
