"""One executor interface: a local process pool, or a real Dask cluster over loopback.

The Dask test starts a ``distributed.LocalCluster`` (2 worker processes, 127.0.0.1), runs the
TBSS step through ``make_executor(dask_scheduler=...)`` and compares every result with the
same step run on the local process pool.
"""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import UsageError
from bids_app.group.executor import make_executor, run_tasks
from bids_app.group.tbss import run_tbss
from conftest import tbss_args


def _square_and_pid(x, *, offset=0):
    return x * x + offset, os.getpid()


def _fail(x):
    if x == 3:
        raise ValueError("task 3 failed")
    return x


def test_local_pool_runs_tasks_in_worker_processes():
    with make_executor(2) as ex:
        got = dict(run_tasks(ex, _square_and_pid, [((i,), {"offset": 1}) for i in range(6)], desc="t",
                             disable_progress=True))
    assert sorted(got) == list(range(6))
    assert [got[i][0] for i in range(6)] == [i * i + 1 for i in range(6)]
    assert os.getpid() not in {pid for _, pid in got.values()}


def test_task_failure_propagates():
    with make_executor(1) as ex:
        with pytest.raises(ValueError, match="task 3 failed"):
            list(run_tasks(ex, _fail, [((i,), {}) for i in range(5)], desc="t", disable_progress=True))


def _slow_write(path):
    import time
    time.sleep(30)
    with open(path, "w") as f:
        f.write("written after the interrupt")


def test_interrupt_stops_the_pool_workers_at_once(tmp_path):
    """Ctrl-C or SIGTERM (a KeyboardInterrupt in the main process) while tasks run: the workers are
    ended and queued tasks dropped, so nothing keeps writing after the run is gone."""
    import time
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with make_executor(2) as ex:
            futures = [ex.submit(_slow_write, str(tmp_path / f"out{i}")) for i in range(4)]
            while len(ex._processes) < 2 or not any(f.running() for f in futures):
                time.sleep(0.05)
            workers = list(ex._processes.values())
            raise KeyboardInterrupt
    assert time.monotonic() - t0 < 20
    assert workers and not any(p.is_alive() for p in workers)
    assert all(f.cancelled() or f.done() for f in futures)
    time.sleep(1.0)
    assert not list(tmp_path.iterdir())


def test_bad_scheduler_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        with make_executor(dask_scheduler=str(tmp_path / "scheduler.json")):
            pass
    with pytest.raises(UsageError, match="cannot connect"):
        with make_executor(dask_scheduler="tcp://127.0.0.1:9", timeout="2s"):
            pass


def _tbss(bids, out, executor):
    args = tbss_args("--tbss-quick")
    return run_tbss(bids_dir=bids, output_dir=out, participants=[{"sub": s} for s in ("01", "02", "03", "07")],
                    options=args, executor=executor, progress=False)


def _copy(cohort, dst):
    bids_src, out_src, _ = cohort
    shutil.copytree(bids_src, dst / "bids")
    shutil.copytree(out_src, dst / "out")
    return dst / "bids", dst / "out"


@pytest.mark.slow
def test_dask_local_cluster_matches_local_pool(tmp_path, tbss_cohort):
    distributed = pytest.importorskip("distributed")
    cohort = tbss_cohort
    bids_a, out_a = _copy(cohort, tmp_path / "pool")
    bids_b, out_b = _copy(cohort, tmp_path / "dask")
    with make_executor(2) as ex:
        res_a = _tbss(bids_a, out_a, ex)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        # the scheduler-file route, as a SLURM job would use it
        sched_file = tmp_path / "scheduler.json"
        sched_file.write_text(json.dumps({"address": cluster.scheduler_address, "type": "Scheduler"}))
        with make_executor(dask_scheduler=str(sched_file)) as ex:
            res_b = _tbss(bids_b, out_b, ex)
            # tasks really ran on the cluster's worker processes
            pids = {pid for _, (_, pid) in run_tasks(ex, _square_and_pid, [((i,), {}) for i in range(4)],
                                                     desc="t", disable_progress=True)}
    assert os.getpid() not in pids
    assert res_a["target"]["Label"] == res_b["target"]["Label"]
    for key in ("space", "n_participants", "skeleton_voxels", "mean_corr_before", "mean_corr_after"):
        assert res_a[key] == res_b[key], key
    da, db = out_a / "group" / "tbss", out_b / "group" / "tbss"
    assert (da / "desc-targetscorescoarse_table.tsv").read_text() == (db / "desc-targetscorescoarse_table.tsv").read_text()
    names = sorted(p.relative_to(da) for p in da.rglob("*.nii.gz"))
    assert names == sorted(p.relative_to(db) for p in db.rglob("*.nii.gz")) and len(names) > 10
    for name in names:
        a = np.asarray(nib.load(str(da / name)).dataobj)
        b = np.asarray(nib.load(str(db / name)).dataobj)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=str(name))
