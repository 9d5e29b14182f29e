"""Reliability and security: caches and imports, array jobs, file system faults, kills, hostile inputs.

Each case goes through the real command line where it is about the command line.  Faults are real:
a file-size limit (``RLIMIT_FSIZE``: EFBIG, works for any user), a small tmpfs (ENOSPC), read-only
folders (``chmod`` as a normal user; a read-only bind mount or ``chattr +i`` as root, since root
ignores permission bits); a case that cannot be set up on this machine is skipped, never faked.
"""
import contextlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import OutputError, UsageError
from conftest import ROOT, run_cli, start_cli

FAST = ("--skip-bids-validation", "--odf-model", "csa", "--tracking", "none", "--nthreads", "1")


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob(".*") if ".partial-" in p.name or ".parts-" in p.name]


def _one_line_errors(stderr: str) -> list[str]:
    """The lines the CLI prints as its own errors; and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.startswith("tractoscale: error:")]


# ------------------------------------------------------------------------------ read-only helpers

def _run_quiet(*cmd) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` (a file or a folder) unwritable even for root; skip if this machine cannot."""
    path = Path(path)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield "chmod"
        finally:
            path.chmod(mode)
        return
    if _run_quiet("mount", "--bind", str(path), str(path)):
        if _run_quiet("mount", "-o", "remount,bind,ro", str(path)):
            try:
                yield "read-only bind mount"
            finally:
                _run_quiet("umount", str(path))
            return
        _run_quiet("umount", str(path))
    if shutil.which("chattr") and _run_quiet("chattr", "+i", str(path)):
        try:
            yield "chattr +i"
        finally:
            _run_quiet("chattr", "-i", str(path))
        return
    pytest.skip("running as root without the right to mount or chattr: cannot make a read-only folder")


# ------------------------------------------------------------------------------ security: Numba cache

@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """An isolated temporary folder (for the <tmp>/tractoscale-numba-<uid> fallback), no cache set."""
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nonexistent-file" / "x"))
    (tmp_path / "nonexistent-file").write_text("a file: the XDG candidate cannot be created")
    from bids_app import resources
    monkeypatch.setattr(resources, "numba_cache_note", None)
    return tmp


def _ensure(monkeypatch, value=None) -> Path:
    from bids_app.resources import ensure_numba_cache_dir
    if value is not None:
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(value))
    chosen = ensure_numba_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(chosen)
    st = os.lstat(chosen)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
    return chosen


def test_numba_cache_private_folder_is_used(cache_env, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    assert _ensure(monkeypatch, mine) == mine.resolve()


def test_numba_cache_symlink_is_refused(cache_env, tmp_path, monkeypatch):
    """A link (say, swapped in by someone else) is never followed, even to a folder of ours."""
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    chosen = _ensure(monkeypatch, link)
    assert chosen not in (link, target.resolve())
    assert chosen == cache_env / f"tractoscale-numba-{os.getuid()}"     # the per-user fallback
    from bids_app import resources
    assert "symbolic link" in resources.numba_cache_note


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_numba_cache_writable_by_others_is_refused(cache_env, tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    assert _ensure(monkeypatch, shared) != shared.resolve()


def test_numba_cache_under_a_folder_others_can_rename_is_refused(cache_env, tmp_path, monkeypatch):
    """Our own 0700 folder inside a world-writable folder without the sticky bit: anyone could
    rename it away and put theirs in its place."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    mine = parent / "cache"
    mine.mkdir(mode=0o700)
    assert _ensure(monkeypatch, mine) != mine.resolve()
    sticky = tmp_path / "sticky"          # like /tmp: others cannot rename what is ours
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "cache").mkdir(mode=0o700)
    assert _ensure(monkeypatch, sticky / "cache") == (sticky / "cache").resolve()


def test_numba_cache_levels_created_private_whatever_the_umask(cache_env, tmp_path, monkeypatch):
    old = os.umask(0o002)                 # a common cluster umask: group-writable folders
    try:
        chosen = _ensure(monkeypatch, tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    assert chosen == (tmp_path / "a" / "b" / "c").resolve()
    for level in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE(os.lstat(tmp_path / level).st_mode) == 0o700, level


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_numba_cache_owned_by_someone_else_is_refused(cache_env, tmp_path, monkeypatch):
    """Another user's /tmp/numba_cache (what Apptainer's shared /tmp gives), and another user's
    folder planted at the per-user fallback name: both refused, a private temporary one is used."""
    theirs = tmp_path / "numba_cache"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 12345, 12345)
    planted = cache_env / f"tractoscale-numba-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, 12345, 12345)
    chosen = _ensure(monkeypatch, theirs)
    assert chosen not in (theirs, planted)
    assert chosen.parent == cache_env and chosen.name.startswith("tractoscale-numba-")


def test_work_dir_is_fresh_and_private(demo_bids, tmp_path):
    """-w: a folder already there under the name a run would use (a link, someone else's) is never
    reused; the run's folder is created 0700 and removed at the end."""
    from bids_app.config import Config
    from bids_app.workflows.participant import _work_dir
    work = tmp_path / "work"
    work.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / f"tractoscale_{os.getpid()}").symlink_to(elsewhere)
    config = Config.from_argv([str(demo_bids), str(tmp_path / "out"), "participant", "-w", str(work)])
    with _work_dir(config) as path:
        assert path.parent == work and not path.is_symlink()
        st = os.lstat(path)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        (path / "x").write_text("scratch")
    assert not path.exists() and not list(elsewhere.iterdir())


def test_no_code_imported_from_the_working_directory(demo_copy, tmp_path):
    """Run from inside a dataset that holds a numpy.py, with an empty entry in PYTHONPATH (which
    means the working directory, as `export PYTHONPATH=$PYTHONPATH:/opt/lib` gives): neither the app
    nor the CSD fit's worker processes import it."""
    marker = tmp_path / "imported"
    (demo_copy / "numpy.py").write_text(textwrap.dedent(f"""
        import os
        open({str(marker)!r} + "-" + str(os.getpid()), "w").close()
        raise ImportError("planted numpy.py imported")
        """))
    proc = run_cli(demo_copy, tmp_path / "out", "participant", "--participant-label", "01",
                   "--skip-bids-validation", "--odf-model", "csd", "--tracking", "none", "--nthreads", "2",
                   cwd=demo_copy, env={"PYTHONPATH": ""})      # run_cli makes it "<project root>:"
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("imported-*")), "the planted numpy.py was imported"
    assert (tmp_path / "out" / "sub-01" / "dwi" / "sub-01_model-csd_param-sh_dwimap.nii.gz").exists()


# ------------------------------------------------------------------------------ array jobs

DISCOVER_TASK = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from bids_app.discovery import discover
go = Path({go!r})
while not go.exists():
    time.sleep(0.01)
inputs = discover(Path({bids!r}), [sys.argv[1]], database_dir=Path({db!r}), shared_database=True)
print(",".join(i.label for i in inputs))
"""


def test_shared_database_built_once_by_concurrent_processes(demo_bids, tmp_path):
    """Four processes (two per subject) create one --bids-database-dir at the same instant: each
    finds its own subject's DWI (the index holds the whole dataset; queries select)."""
    db, go = tmp_path / "db", tmp_path / "go"
    script = tmp_path / "task.py"
    script.write_text(DISCOVER_TASK.format(root=str(ROOT), go=str(go), bids=str(demo_bids), db=str(db)))
    procs = [subprocess.Popen([sys.executable, str(script), sub], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for sub in ("01", "02", "01", "02")]
    time.sleep(2.0)          # every process imported pybids and waits at the line
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, sub, (out, err) in zip(procs, ("01", "02", "01", "02"), outs):
        assert p.returncode == 0, err
        assert out.strip() == f"sub-{sub}"
    from bids_app.discovery import read_index_marker
    marker = read_index_marker(db)
    assert marker["Subjects"] == ["01", "02"] and marker["Root"] == str(demo_bids.resolve())
    assert not list(db.glob(".building-*"))


def test_shared_database_refuses_other_indexes_and_follows_new_subjects(demo_copy, tmp_path):
    from bids_app.discovery import discover
    db = tmp_path / "db"
    assert [i.label for i in discover(demo_copy, ["01"], database_dir=db, shared_database=True)] == ["sub-01"]
    built = (db / "layout_index.sqlite").stat().st_mtime_ns
    discover(demo_copy, ["02"], database_dir=db, shared_database=True)
    assert (db / "layout_index.sqlite").stat().st_mtime_ns == built     # reused, not rebuilt
    # a subject added to the dataset: the index is rebuilt and finds it
    shutil.copytree(demo_copy / "sub-02", demo_copy / "sub-03")
    for f in (demo_copy / "sub-03").rglob("sub-02_*"):
        f.rename(f.with_name(f.name.replace("sub-02", "sub-03")))
    assert [i.label for i in discover(demo_copy, ["03"], database_dir=db, shared_database=True)] == ["sub-03"]
    # another dataset's index, or one tractoscale did not make: a usage error, never silently used
    other = tmp_path / "other"
    shutil.copytree(demo_copy, other)
    with pytest.raises(UsageError, match="indexes"):
        discover(other, ["01"], database_dir=db, shared_database=True)
    from bids import BIDSLayout
    BIDSLayout(str(demo_copy), database_path=str(tmp_path / "theirs"), validate=False)   # e.g. another app's
    with pytest.raises(UsageError, match="did not make"):
        discover(demo_copy, ["01"], database_dir=tmp_path / "theirs", shared_database=True)


@pytest.mark.slow
def test_array_tasks_share_database_and_a_participant_started_twice_runs_once(demo_bids, tmp_path):
    """Three tasks at once into one output folder with one shared --bids-database-dir: sub-01,
    sub-02, and sub-01 again.  All succeed; sub-01's stages run in one process only: the other
    waits on the run's lock, then finds the completion records complete."""
    out, db, work = tmp_path / "out", tmp_path / "db", tmp_path / "work"
    args = ("participant", "--bids-database-dir", db, "-w", work, "-v", *FAST)
    procs = [start_cli(demo_bids, out, *args, "--participant-label", sub) for sub in ("01", "02", "01")]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se
    first, second = results[0][0], results[2][0]
    assert "1 processed" in results[1][0]
    assert sorted(["1 processed" in first, "1 processed" in second]) == [False, True], (first, second)
    assert "1 already complete" in (first if "1 processed" in second else second)
    pids = {json.loads(r.read_text())["pid"] for r in (out / "sub-01" / "dwi" / ".stages").glob("*.json")}
    assert len(pids) == 1, "sub-01's stages ran in two processes"
    assert not list(work.iterdir())      # each task removed its own private work folder
    assert not _temporaries(out)


# ------------------------------------------------------------------------------ file system faults

def _limit_file_size(nbytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_file_too_large_fails_that_run_with_73_others_continue(demo_bids, tmp_path):
    """A real write error (EFBIG: the process may not write files over 1 MB; the SH map is larger)
    ends each run with a one-line error naming the file, exit 73, every participant attempted,
    nothing half-written."""
    out = tmp_path / "out"
    proc = run_cli(demo_bids, out, "participant", *FAST, preexec_fn=_limit_file_size(1 << 20))
    assert proc.returncode == 73, proc.stderr
    errors = _one_line_errors(proc.stderr)
    assert "0 processed, 0 already complete, 2 failed" in proc.stdout
    for sub in ("01", "02"):
        line = next(e for e in errors if f"sub-{sub}:" in e)
        assert f"cannot write {out / f'sub-{sub}' / 'dwi' / f'sub-{sub}_model-csa_param-sh_dwimap.nii.gz'}" in line
        assert "File too large" in line
        # the stage before it completed and was kept
        assert (out / f"sub-{sub}" / "dwi" / ".stages" / f"sub-{sub}_dti.json").exists()
        assert not (out / f"sub-{sub}" / "dwi" / ".stages" / f"sub-{sub}_odf-csa.json").exists()
    assert not _temporaries(out)


def test_disk_full_is_a_one_line_error(demo_bids, tmp_path):
    """ENOSPC on a real (tiny) file system."""
    out = tmp_path / "small"
    out.mkdir()
    if os.geteuid() != 0 or not _run_quiet("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)):
        pytest.skip("mounting a small tmpfs needs root and the right to mount")
    try:
        proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", *FAST)
        assert proc.returncode == 73, proc.stderr
        (line,) = _one_line_errors(proc.stderr)
        assert "No space left on device" in line and f"cannot write {out}" in line
        assert not _temporaries(out)
    finally:
        _run_quiet("umount", str(out))


def test_read_only_subject_folder_fails_only_that_participant(demo_bids, tmp_path):
    out = tmp_path / "out"
    (out / "sub-02").mkdir(parents=True)
    with read_only(out / "sub-02"):
        proc = run_cli(demo_bids, out, "participant", *FAST)
    assert proc.returncode == 73, proc.stderr
    (line,) = _one_line_errors(proc.stderr)
    assert line.startswith("tractoscale: error: sub-02: cannot write") and str(out / "sub-02") in line
    assert "1 processed, 0 already complete, 1 failed" in proc.stdout
    assert (out / "sub-01" / "dwi" / "sub-01_model-csa_param-sh_dwimap.nii.gz").exists()


@pytest.mark.parametrize("what", ["logs", "lock"])
def test_unwritable_log_folder_or_lock_file_is_73(demo_bids, tmp_path, what):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "logs" if what == "logs" else out / ".dataset_description.json.lock"
    target.mkdir() if what == "logs" else target.touch()
    with read_only(target):
        proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", *FAST)
    assert proc.returncode == 73, proc.stderr
    errors = _one_line_errors(proc.stderr)
    assert errors and all(str(target) in e for e in errors), errors
    assert not (out / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz").exists()


# ------------------------------------------------------------------------------ kills

def _wait_for(predicate, timeout, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_during_tracking_cleans_up(demo_bids, tmp_path):
    """SLURM's time limit sends SIGTERM: the run stops like after Ctrl-C, removes the tractogram's
    unfinished parts, leaves no completion record for the stage, and exits 143."""
    out = tmp_path / "out"
    dwi = out / "sub-01" / "dwi"
    proc = start_cli(demo_bids, out, "participant", "--participant-label", "01", "--skip-bids-validation",
                     "--odf-model", "csa", "--seeds-per-voxel", "40", "--no-progress")
    try:
        _wait_for(lambda: list(dwi.glob(".*.parts-*")) or proc.poll() is not None, 600, "tracking to start")
        assert proc.poll() is None, "the run ended before tracking started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not _temporaries(out)
    assert not (dwi / ".stages" / "sub-01_track-prob.json").exists()
    assert (dwi / ".stages" / "sub-01_odf-csa.json").exists()     # finished stages are kept


def _descendants(pid: int) -> dict[int, int]:
    """{pid: depth} of every process below ``pid`` (children 1, grandchildren 2...)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [(pid, 0)]
    while todo:
        parent, depth = todo.pop()
        for c in children.get(parent, []):
            out[c] = depth + 1
            todo.append((c, depth + 1))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_stops_group_workers(participant_run, demo_bids, tmp_path):
    """A group run killed by SIGTERM stops its worker processes: none outlives it."""
    out = tmp_path / "deriv"
    shutil.copytree(participant_run[0], out, ignore=shutil.ignore_patterns("group", "logs"))
    proc = start_cli(demo_bids, out, "group", "--skip-bids-validation", "--nthreads", "2", "--no-progress")
    try:
        # the pool's workers are the forkserver's children: the run's grandchildren
        _wait_for(lambda: 2 in _descendants(proc.pid).values() or proc.poll() is not None, 600,
                  "worker processes")
        assert proc.poll() is None, "the group run ended before its workers started"
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    # gone with the run (before, workers kept running their task after the main process died)
    _wait_for(lambda: not any(_alive(p) for p in workers), 2, "the workers to end")


HOLDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from bids_app.derivatives import atomic_write
with atomic_write({path!r}) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_stale_temporaries_of_dead_processes_are_removed_at_start(participant_run, demo_bids, tmp_path):
    """A writer killed with SIGKILL leaves its temporary file; one still writing holds its lock.  The
    next run removes the first and leaves the second alone.  Another machine's temporaries (whose
    locks a shared file system may not show here) are removed only after an hour untouched."""
    from bids_app.derivatives import host_tag
    out = tmp_path / "deriv"
    shutil.copytree(participant_run[0], out, ignore=shutil.ignore_patterns("group", "logs"))
    dwi = out / "sub-01" / "dwi"
    holders = []
    for name in ("dead", "alive"):
        script = tmp_path / f"{name}.py"
        script.write_text(HOLDER.format(root=str(ROOT), path=str(dwi / f"{name}.json")))
        holders.append(subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True))
    dead_tmp, alive_tmp = (Path(h.stdout.readline().strip()) for h in holders)
    holders[0].kill()
    holders[0].wait()
    assert f"-{host_tag()}-{holders[0].pid}-" in dead_tmp.name
    # a tractogram writer killed on this machine, and two files of a writer on another machine
    parts = dwi / f".sub-01_track-prob_tractogram.trx.parts-{host_tag()}-{holders[0].pid}-abcd"
    parts.mkdir()
    (parts / "positions").write_bytes(b"\0" * 64)
    other = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    foreign_recent = dwi / f".sub-01_dti.partial-{other}-77-abcd1234.json"
    foreign_old = dwi / f".sub-01_qc.partial-{other}-78-abcd1234.json"
    ages = {dead_tmp: 120, alive_tmp: 7200, parts: 120, parts / "positions": 120,
            foreign_recent: 600, foreign_old: 7200}
    for p, age in ages.items():
        if not p.exists():
            p.write_text("{")
        os.utime(p, (time.time() - age, time.time() - age))
    try:
        proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", "--odf-model", "csa",
                       "--skip-bids-validation", "-v", check=True)
        assert "1 already complete" in proc.stdout
        assert not dead_tmp.exists() and not parts.exists() and not foreign_old.exists()
        assert alive_tmp.exists() and foreign_recent.exists()
    finally:
        holders[1].kill()
        holders[1].wait()


# ------------------------------------------------------------------------------ hostile inputs

def _add_subject(root: Path, src: str, dst: str) -> Path:
    shutil.copytree(root / f"sub-{src}", root / f"sub-{dst}")
    for f in (root / f"sub-{dst}").rglob(f"sub-{src}_*"):
        f.rename(f.with_name(f.name.replace(f"sub-{src}", f"sub-{dst}")))
    return root / f"sub-{dst}" / "dwi" / f"sub-{dst}_dwi.nii.gz"


def test_hostile_images_are_refused_before_allocation(demo_copy, tmp_path):
    """One run, five broken subjects, one healthy: each broken one gets its own one-line reason (exit
    65), nothing is written for it, and the healthy one is processed."""
    img = nib.load(str(demo_copy / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"))
    data = np.asarray(img.dataobj)
    hdr = img.header.copy()
    # 03: a header claiming 300x300x300x36 int16 (1.9 GB) in a 1 MB uncompressed file
    p = _add_subject(demo_copy, "01", "03")
    p.unlink()
    huge = hdr.copy()
    huge.set_data_shape((300, 300, 300, data.shape[3]))
    huge.set_data_dtype(np.int16)
    huge["vox_offset"] = 352
    with open(p.with_suffix(""), "wb") as f:       # sub-03_dwi.nii
        f.write(huge.binaryblock + b"\0" * 4 + os.urandom(1 << 20))
    # 04: the same claim in a .nii.gz (more than deflate can hold in the file)
    p = _add_subject(demo_copy, "01", "04")
    p.write_bytes(__import__("gzip").compress(huge.binaryblock + b"\0" * 4 + b"\0" * (1 << 20)))
    # 05: all zeros; 06: complex; 07: truncated
    nib.save(nib.Nifti1Image(np.zeros(data.shape, np.int16), img.affine, hdr), _add_subject(demo_copy, "01", "05"))
    cplx = nib.Nifti1Image(data.astype(np.complex64), img.affine)
    nib.save(cplx, _add_subject(demo_copy, "01", "06"))
    p = _add_subject(demo_copy, "01", "07")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    shutil.rmtree(demo_copy / "sub-02")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = run_cli(demo_copy, out, "participant", *FAST)
    assert proc.returncode == 65, proc.stderr
    errors = {e.split(":")[2].strip(): e for e in _one_line_errors(proc.stderr)}
    assert "header claims 300x300x300x36 int16" in errors["sub-03"] and "holds 1.0 MB" in errors["sub-03"]
    assert "cannot hold that much" in errors["sub-04"]
    assert "no signal" in errors["sub-05"]
    assert "complex-valued" in errors["sub-06"]
    assert "truncated" in errors["sub-07"]
    assert set(errors) == {"sub-03", "sub-04", "sub-05", "sub-06", "sub-07"}
    assert "1 processed" in proc.stdout
    for sub in ("03", "04", "05", "06", "07"):
        assert not list((out / f"sub-{sub}").rglob("*.nii.gz")), sub
    assert time.perf_counter() - t0 < 300


def test_image_larger_than_the_memory_limit(demo_bids):
    from bids_app.errors import InputDataError
    from bids_app.inputs import load_dwi
    d = demo_bids / "sub-01" / "dwi"
    with pytest.raises(InputDataError, match=r"need 8\.4 MB of memory as float32, more than the 1\.0 MB"):
        load_dwi(d / "sub-01_dwi.nii.gz", d / "sub-01_dwi.bval", d / "sub-01_dwi.bvec", memory_limit=1 << 20)
    assert load_dwi(d / "sub-01_dwi.nii.gz", d / "sub-01_dwi.bval", d / "sub-01_dwi.bvec",
                    memory_limit=16 << 20).data.shape == (40, 48, 32, 36)


def test_symlink_loop_finds_each_dwi_once(demo_copy, tmp_path):
    from bids_app.discovery import discover
    (demo_copy / "sub-01" / "dwi" / "loop").symlink_to(demo_copy / "sub-01" / "dwi")
    (demo_copy / "sub-02" / "dwi" / "copy_dwi.nii.gz").symlink_to(demo_copy / "sub-02" / "dwi" / "sub-02_dwi.nii.gz")
    inputs = discover(demo_copy, ["01", "02"])
    assert [(i.label, i.dwi) for i in inputs] == [
        ("sub-01", demo_copy / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"),
        ("sub-02", demo_copy / "sub-02" / "dwi" / "sub-02_dwi.nii.gz")]


def test_desc_filter_on_raw_dataset_is_a_usage_error(demo_bids, tmp_path):
    f = tmp_path / "filter.json"
    f.write_text(json.dumps({"dwi": {"desc": "preproc"}}))
    proc = run_cli(demo_bids, tmp_path / "out", "participant", "--bids-filter-file", f, "--skip-bids-validation")
    assert proc.returncode == 64, proc.stderr
    (line,) = _one_line_errors(proc.stderr)
    assert '"desc"' in line and "--input-derivatives" in line


def test_outputs_errors_name_the_path():
    from bids_app.errors import IOFailure, describe_os_error
    err = describe_os_error(PermissionError(13, "Permission denied", "/data/out/sub-01/x.nii.gz"), "/data/out")
    assert isinstance(err, OutputError) and err.exit_code == 73
    assert str(err) == "cannot write /data/out/sub-01/x.nii.gz: Permission denied"
    err = describe_os_error(PermissionError(13, "Permission denied", "/data/bids/sub-01/dwi.nii.gz"), "/data/out")
    assert isinstance(err, IOFailure) and err.exit_code == 74 and "cannot read" in str(err)
    err = describe_os_error(OSError(28, "No space left on device"), "/data/out")
    assert isinstance(err, OutputError)


def test_unreadable_input_is_an_io_error(demo_copy):
    """The system refusing to read a file (here: a folder where the b-values should be, EISDIR) is
    exit 74 naming the path, not "bad data"."""
    from bids_app.errors import IOFailure
    from bids_app.inputs import load_dwi
    d = demo_copy / "sub-01" / "dwi"
    (d / "sub-01_dwi.bval").unlink()
    (d / "sub-01_dwi.bval").mkdir()
    with pytest.raises(IOFailure, match=f"cannot read {d / 'sub-01_dwi.bval'}: Is a directory") as err:
        load_dwi(d / "sub-01_dwi.nii.gz", d / "sub-01_dwi.bval", d / "sub-01_dwi.bvec")
    assert err.value.exit_code == 74


TRX_TOO_LARGE = """
import resource, sys
sys.path.insert(0, {root!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
import numpy as np
from bids_app.errors import OutputError
from bids_app.trx_writer import TrxStreamWriter
try:
    with TrxStreamWriter({path!r}, np.eye(4), (10, 10, 10), dps={{"length": ("float32", 1)}}) as w:
        for _ in range(100):
            w.append(np.zeros((1000, 3), np.float32), np.full(10, 100), dps={{"length": np.ones(10)}})
except OutputError as exc:
    print(exc)
"""


@pytest.mark.parametrize("fmt", ["trx", "tck"])
def test_tractogram_writer_on_a_failing_disk(tmp_path, fmt):
    """The streaming writer hits a write error (EFBIG past 64 KB) while appending chunks: one
    OutputError naming the tractogram, no parts folder and no final file left."""
    path = tmp_path / f"sub-01_tractogram.{fmt}"
    script = tmp_path / "w.py"
    script.write_text(TRX_TOO_LARGE.format(root=str(ROOT), path=str(path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot write {path}: File too large"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.py"]
