"""One executor interface for group-level tasks.

:func:`make_executor` yields a :class:`concurrent.futures.Executor`: a local process pool
(``nthreads`` workers) by default, or Dask distributed when a scheduler address
(``tcp://host:8786``) or a scheduler file (JSON written by ``dask scheduler
--scheduler-file``) is given.  Callers only use ``submit`` and futures, so the same code
runs on a laptop and on a cluster.

Dask on SLURM (dask-jobqueue), for example::

    # start_cluster.py, run once on a login node
    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=4, processes=4, memory="16GB", walltime="04:00:00")
    cluster.scale(jobs=10)                       # 10 SLURM jobs x 4 workers
    print(cluster.scheduler_address)             # e.g. tcp://10.0.0.5:38271
    # ... keep this process alive while tractoscale runs

    tractoscale bids/ out/ group --dask-scheduler tcp://10.0.0.5:38271

The workers must see ``output_dir`` at the same path (a shared file system): every task
reads its inputs from and writes its result to ``output_dir``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from ..errors import UsageError

log = logging.getLogger(__name__)


def _limit_worker_threads():
    """Pool initializer: one BLAS/OpenMP thread per worker process (workers are the parallelism)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:  # optional
        pass


def _dask_client(scheduler: str, timeout: str = "30s"):
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--dask-scheduler needs Dask distributed: pip install 'tractoscale[dask]'") from None
    path = Path(scheduler)
    try:
        if scheduler.endswith(".json") or path.is_file():
            if not path.is_file():
                raise UsageError(f"Dask scheduler file {scheduler} does not exist")
            return Client(scheduler_file=str(path), timeout=timeout)
        return Client(scheduler, timeout=timeout)
    except UsageError:
        raise
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"cannot connect to the Dask scheduler {scheduler!r}: {exc}") from None


@contextlib.contextmanager
def make_executor(nthreads: int | None = None, dask_scheduler: str | None = None, *,
                  timeout: str = "30s") -> Iterator[Executor]:
    """Context manager yielding a ``concurrent.futures.Executor``.

    ``dask_scheduler``: a Dask scheduler address or scheduler-file path (connection
    ``timeout``); otherwise a local process pool with ``nthreads`` workers (default: all CPUs).
    """
    if dask_scheduler:
        client = _dask_client(str(dask_scheduler), timeout)
        log.info("Dask scheduler %s: %d workers", client.scheduler.address,
                 len(client.scheduler_info().get("workers", {})))
        ex = client.get_executor(pure=False)
        try:
            yield ex
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM) or failed: drop our queued tasks from the cluster rather
            # than wait for them; tasks already running finish (their outputs are written atomically)
            ex.shutdown(wait=False)      # cancels this executor's futures
            raise
        else:
            ex.shutdown(wait=True)
        finally:
            client.close()
        return
    n = max(1, int(nthreads or os.cpu_count() or 1))
    ctx = multiprocessing.get_context("forkserver")
    ex = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_limit_worker_threads)
    try:
        yield ex
    except KeyboardInterrupt:        # Ctrl-C or SIGTERM (see bids_app.cli): stop the workers now
        stop_pool(ex)
        raise
    except BaseException:            # a task failed: running ones finish (their results are kept)
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        ex.shutdown(wait=True)


def stop_pool(ex: ProcessPoolExecutor, grace: float = 5.0) -> None:
    """Stop a local pool now: cancel queued tasks and end the worker processes (SIGTERM, then
    SIGKILL after ``grace`` seconds), so no worker outlives an interrupted run or keeps writing."""
    processes = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(grace)
            if p.is_alive():
                p.kill()
                p.join(1.0)


def run_tasks(executor: Executor, fn: Callable, calls: Iterable[tuple[tuple, dict]], *, desc: str,
              disable_progress: bool | None = None) -> Iterator[tuple[int, object]]:
    """Submit ``fn(*args, **kwargs)`` for every call and yield ``(index, result)`` as each finishes.

    A tqdm bar counts finished tasks.  If a task fails, the other pending tasks are
    cancelled and the exception is re-raised (results already yielded are kept by the
    caller, and tasks save their own output, so a rerun resumes).
    """
    from tqdm import tqdm

    calls = list(calls)
    futures: dict[Future, int] = {}
    for i, (args, kwargs) in enumerate(calls):
        # bind keywords first: Dask's executor would read some names (key, workers...) itself
        call = functools.partial(fn, **kwargs) if kwargs else fn
        futures[executor.submit(call, *args)] = i
    bar = tqdm(total=len(futures), desc=desc, unit="task", disable=disable_progress)
    try:
        for fut in as_completed(futures):
            i = futures[fut]
            result = fut.result()
            bar.update(1)
            yield i, result
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        bar.close()
