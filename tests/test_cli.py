"""Command-line handling and exit codes through the real `tractoscale` command."""
import json
import shutil

import pytest

from bids_app import __version__
from bids_app.cli import build_parser
from conftest import run_cli


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"tractoscale {__version__}"
    assert __version__ != "0+unknown"


def test_help_lists_bids_app_flags():
    text = build_parser().format_help()
    for flag in ("--participant-label", "--session-label", "--skip-bids-validation", "--work-dir",
                 "--nthreads", "--omp-nthreads", "--mem", "--bids-filter-file", "--bids-database-dir",
                 "--device", "--odf-model", "--sh-order", "--input-derivatives", "--force"):
        assert flag in text, flag


@pytest.mark.parametrize("args, code, words", [
    (["{bids}", "{out}", "subject"], 17, "unknown analysis level"),
    (["{bids}", "{out}", "participant", "--no-such-flag"], 64, "unrecognized arguments"),
    (["{bids}", "{out}", "participant", "--participant-label", "99"], 64, "unknown participant label"),
    (["{bids}", "{out}", "participant", "--device", "tpu"], 64, "invalid choice"),
    (["{bids}", "{out}", "participant", "--nthreads", "0"], 64, "--nthreads"),
    (["{bids}", "{out}", "participant", "--omp-nthreads", "-1"], 64, "--omp-nthreads must be >= 1"),
    (["{bids}", "{out}", "participant", "--mem", "lots"], 64, "--mem: invalid float value"),
    (["{bids}", "{out}", "participant", "--session-label", "9"], 18, "unknown session label"),
    (["{bids}", "{out}", "participant", "--sh-order", "5"], 64, "even"),
    (["{bids}/missing", "{out}", "participant"], 66, "does not exist"),
    (["{bids}", "{bids}/sub-01/out", "participant"], 64, "inside the input dataset"),
    (["{bids}", "{out}", "participant", "--bids-filter-file", "{bids}/nofilter.json"], 66, "does not exist"),
])
def test_user_mistakes_exit_codes(demo_bids, tmp_path, args, code, words):
    args = [a.format(bids=demo_bids, out=tmp_path / "out") for a in args]
    proc = run_cli(*args, "--skip-bids-validation")
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "out" / "sub-01").exists()


def test_labels_with_and_without_prefix_and_underscore_alias(demo_bids):
    from bids_app.config import Config
    a = Config.from_argv([str(demo_bids), "o", "participant", "--participant_label", "sub-01", "02"])
    assert list(a.selection.participant_label) == ["01", "02"]
    a = build_parser().parse_args([str(demo_bids), "o", "participant", "--session_label", "ses-A"])
    assert a.session_label == ["ses-A"]


def test_validation_failure_exit_16(demo_copy, tmp_path):
    # a file the BIDS validator must reject: a NIfTI with an unknown suffix
    shutil.copy(demo_copy / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", demo_copy / "sub-01" / "dwi" / "sub-01_bogus.nii.gz")
    proc = run_cli(demo_copy, tmp_path / "out", "participant", "--participant-label", "01")
    assert proc.returncode == 16, proc.stderr
    assert "not valid BIDS" in proc.stderr and "--skip-bids-validation" in proc.stderr


def test_filter_matching_nothing_exit_18(demo_bids, tmp_path):
    f = tmp_path / "filter.json"
    f.write_text(json.dumps({"dwi": {"acquisition": "nonexistent"}}))
    proc = run_cli(demo_bids, tmp_path / "out", "participant", "--bids-filter-file", f, "--skip-bids-validation")
    assert proc.returncode == 18, proc.stderr
    assert "no DWI matches" in proc.stderr


def test_bad_filter_file(demo_bids, tmp_path):
    f = tmp_path / "filter.json"
    f.write_text("{not json")
    proc = run_cli(demo_bids, tmp_path / "out", "participant", "--bids-filter-file", f, "--skip-bids-validation")
    assert proc.returncode == 64 and "not valid JSON" in proc.stderr


def test_subject_without_dwi(demo_copy, tmp_path):
    shutil.rmtree(demo_copy / "sub-02" / "dwi")
    (demo_copy / "sub-02" / "anat").mkdir(exist_ok=True)
    proc = run_cli(demo_copy, tmp_path / "out", "participant", "--participant-label", "02", "--skip-bids-validation")
    assert proc.returncode == 66 and "no DWI found" in proc.stderr


def test_output_not_creatable(demo_bids, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli(demo_bids, blocker / "out", "participant", "--skip-bids-validation")
    assert proc.returncode == 73, proc.stderr


PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
from bids_app.resources import ensure_numba_cache_dir
ensure_numba_cache_dir()
from numba import njit

@njit(cache=True)
def f(x):
    return x + 1

f(1)
d = os.environ["NUMBA_CACHE_DIR"]
print(d, sum(len(fs) for _, _, fs in os.walk(d)))
"""


def test_unwritable_numba_cache_falls_back(tmp_path):
    """A NUMBA_CACHE_DIR that cannot be created (under a regular file) is replaced by a private
    writable folder before numba is imported, and compiled kernels are cached there."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    blocker = tmp_path / "file"
    blocker.write_text("x")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(blocker / "cache"), "HOME": str(blocker)}
    ok = subprocess.run([sys.executable, str(probe), str(ROOT)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    new_dir, n_files = ok.stdout.split()
    assert not new_dir.startswith(str(blocker)) and int(n_files) > 0


def test_readme_documents_every_option():
    """The README's options tables are generated from the parser and must be current."""
    import subprocess
    import sys
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    for action in build_parser()._actions:
        if action.dest == "help":  # argparse's own -h/--help
            continue
        for flag in action.option_strings:
            if flag.startswith("--") and "_" not in flag:
                assert f"`{flag}`" in readme, f"{flag} is not documented in README.md"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_readme_options.py"), "--check"])
    assert proc.returncode == 0, "README options are stale: run python tools/make_readme_options.py"


@pytest.mark.parametrize("level, args, words", [
    ("participant", ["--device", "cuda"], "--device cuda"),
    ("participant", ["--tracking", "boot", "--odf-model", "csd"], "csa or opdt"),
    ("participant", ["--max-angle", "95"], "--max-angle"),
    ("participant", ["--step-size", "0"], "--step-size"),
    ("participant", ["--min-length", "30", "--max-length", "20"], "--max-length"),
    ("participant", ["--seed-mask", "{tmp}/missing.nii.gz"], "--seed-mask"),
    ("participant", ["--mem", "0"], "--mem"),
    ("participant", ["--mem", "64000000"], "--mem is in GB"),
    ("participant", ["--gpus", "0,x"], "--gpus"),
    ("participant", ["--gpus", "1,1"], "--gpus must list distinct GPU numbers"),
    ("group", ["--tbss-target", "{tmp}/missing_FA.nii.gz"], "no such file"),
    ("group", ["--tbss-target", "NoSuchTemplate"], "not available offline"),
    ("group", ["--tbss-space", "NoSuchTemplate"], "not available offline"),
    ("group", ["--stats-column", "nope"], "not in participants.tsv"),
    ("group", ["--covariates", "age"], "--covariates needs --stats-column"),
    ("group", ["--atlas", "{tmp}/missing.trx"], "--atlas"),
    ("group", ["--atlas", "{bids}/participants.tsv"], "not a TRX"),
    ("group", ["--ot-blur", "0"], "--ot-blur"),
    ("group", ["--seg-method", "nearest"], "invalid choice"),
])
def test_options_checked_before_any_work(demo_bids, tmp_path, level, args, words):
    """Each mistake fails at the edge: exit 64 in under 2 seconds, one line, nothing written."""
    import resource
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, bids=demo_bids) for a in args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_cli(demo_bids, out, level, *args, "--skip-bids-validation",
                   env={"TRACTOSCALE_ALLOW_CUDASIM": "0"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the run (start-up included): wall time would measure how busy the machine is
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 64, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert seconds < 2.0, seconds
    assert not out.exists()
