"""Shared fixtures: one small demo dataset and one participant-level run per test session.

The CUDA simulator is switched on before numba is imported so the CUDA kernels'
Python path runs in CI (no GPU there); `--device auto` ignores the simulator.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))
os.environ.setdefault("MPLBACKEND", "Agg")
# PyTorch's OpenMP threads sleep when idle (spinning ones slow the learned-tracker tests down many
# times over on a shared machine); read when PyTorch loads, as the app sets it (bids_app.learned)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tractoscale_cmd() -> list[str]:
    exe = shutil.which("tractoscale")
    if exe and Path(exe).resolve().parent == Path(sys.executable).resolve().parent:
        return [exe]
    # -P: the working directory is not put on sys.path (as for the installed `tractoscale` script)
    return [sys.executable, "-P", "-m", "bids_app.cli"]


def _cli_env(env=None) -> dict:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return full_env


def start_cli(*args, env=None, cwd=None, **popen_kw) -> subprocess.Popen:
    """Start the real command line in a subprocess without waiting (concurrency, signals)."""
    return subprocess.Popen(tractoscale_cmd() + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_cli_env(env), cwd=cwd or ROOT, **popen_kw)


def run_cli(*args, check=False, env=None, timeout=900, cwd=None, **run_kw) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess (in ``cwd``, default the project root)."""
    proc = subprocess.run(tractoscale_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          env=_cli_env(env), timeout=timeout, cwd=cwd or ROOT, **run_kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"tractoscale {' '.join(map(str, args))} -> {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def demo_bids(tmp_path_factory) -> Path:
    """A 2-subject small demo dataset (one control, one patient)."""
    from bids_app.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "bids", n_subjects=2, size="small", seed=1)


@pytest.fixture(scope="session")
def participant_run(demo_bids, tmp_path_factory):
    """The demo dataset through the real CLI: CSA model, default tracking settings."""
    out = tmp_path_factory.mktemp("deriv") / "derivatives"
    proc = run_cli(demo_bids, out, "participant", "--odf-model", "csa", "--skip-bids-validation",
                   "--nthreads", "2", "-v", check=True)
    return out, proc


@pytest.fixture
def demo_copy(demo_bids, tmp_path) -> Path:
    """A private, writable copy of the demo dataset (for tests that break it)."""
    dst = tmp_path / "bids"
    shutil.copytree(demo_bids, dst, ignore=shutil.ignore_patterns("sourcedata"))
    return dst


# ------------------------------------------------------------------------------------ TBSS

@pytest.fixture(scope="session")
def tbss_cohort(tmp_path_factory):
    """5 controls + 5 patients with DTI maps (bids, output_dir, meta); built once, cached on disk."""
    from bids_app.group.tbss.synthetic import cached_demo_cohort
    return cached_demo_cohort(tmp_path_factory.getbasetemp(), n_controls=5, n_patients=5, undeformed=2)


def group_options(group, *argv):
    """One option group (a bids_app.config dataclass) as the CLI parses it."""
    import argparse

    from bids_app.config import add_group_arguments
    p = argparse.ArgumentParser()
    add_group_arguments(p, group)
    return group.from_namespace(p.parse_args([str(a) for a in argv]))


def tbss_args(*argv):
    """The TBSS options as the CLI parses them."""
    from bids_app.config import Tbss
    return group_options(Tbss, *argv)
