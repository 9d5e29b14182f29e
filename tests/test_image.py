"""The built image, run as users run it. Skips without a container engine and a built image (CI).

    make image                         # docker or podman; BASE_IMAGE=... where the registry is unreachable
    make sif                           # optional: the Apptainer test runs when apptainer and the SIF exist
    NUMBA_ENABLE_CUDASIM=1 .venv/bin/python -m pytest -q tests/test_image.py

TRACTOSCALE_TEST_ENGINE (docker|podman), TRACTOSCALE_TEST_IMAGE and TRACTOSCALE_TEST_SIF choose what
runs; by default the engine and the names `make image` / `make sif` use. Every run is offline
(--network none), on a read-only root file system with a tmpfs /tmp, as a non-root uid, with the
BIDS dataset mounted read-only: participant, then group, on the 2-subject demo.
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
with open(ROOT / "pyproject.toml", "rb") as _fh:
    VERSION = tomllib.load(_fh)["project"]["version"]
IMAGE = os.environ.get("TRACTOSCALE_TEST_IMAGE", f"tractoscale/tractoscale:{VERSION}")
SIF = Path(os.environ.get("TRACTOSCALE_TEST_SIF", ROOT / f"tractoscale_{VERSION}.sif"))
FAST = ["--nthreads", "2", "--odf-model", "csa", "--no-progress"]
TIMEOUT = 3600

pytestmark = pytest.mark.slow


def _engine() -> str | None:
    wanted = os.environ.get("TRACTOSCALE_TEST_ENGINE")
    for name in ([wanted] if wanted else ["docker", "podman"]):
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True).returncode == 0:
            return name
    return None


@pytest.fixture(scope="module")
def engine() -> str:
    name = _engine()
    if name is None:
        pytest.skip("no container engine (docker or podman) answers")
    if subprocess.run([name, "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        pytest.skip(f"no image {IMAGE}: build it with make image")
    # An engine that answers may still be unable to start any container here (a sandbox without
    # the privileges its runtime wants): that is no engine, not a broken image.
    probe = subprocess.run([name, "run", "--rm", "--network", "none", "--entrypoint", "/bin/true", IMAGE],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        pytest.skip(f"{name} cannot start a container here: {probe.stderr.strip()[-300:]}")
    return name


def _owned_folder(path: Path, uid: int, gid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    return path


@pytest.fixture(scope="module")
def user(engine) -> tuple[int, int, list[str]]:
    """(uid, gid, extra engine options): a uid that is neither root nor the image's own (10001)."""
    if os.geteuid() == 0:
        return 4242, 4242, []
    extra = ["--userns=keep-id"] if engine == "podman" else []  # rootless podman: keep our uid
    return os.getuid(), os.getgid(), extra


@pytest.fixture(scope="module")
def bids(demo_bids, tmp_path_factory) -> Path:
    """The demo dataset, readable by any uid (pytest's own folders are private to their owner)."""
    dst = tmp_path_factory.mktemp("image-bids", numbered=True) / "bids"
    shutil.copytree(demo_bids, dst)
    for p in [dst.parent, dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | (0o055 if p.is_dir() else 0))
    return dst


def run_image(engine, user, bids, out, *args, cache: Path | None = None, run_as=True):
    uid, gid, extra = user
    cmd = [engine, "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", *extra,
           "-v", f"{bids}:/data:ro", "-v", f"{out}:/out"]
    if run_as:
        cmd += ["-u", f"{uid}:{gid}"]
    if cache is not None:  # a persistent Numba cache, as the README suggests: compile once for both levels
        cmd += ["-v", f"{cache}:/numba", "-e", "NUMBA_CACHE_DIR=/numba"]
    return subprocess.run(cmd + [IMAGE, "/data", "/out", *args], capture_output=True, text=True, timeout=TIMEOUT)


def check_participant_outputs(out: Path, uid: int, container: dict):
    dwi = out / "sub-01" / "dwi"
    fa_path = dwi / "sub-01_model-tensor_param-fa_dwimap.nii.gz"
    fa = np.asarray(nib.load(fa_path).dataobj)
    assert 0.3 < fa.max() <= 1 and fa.min() >= 0
    assert list(dwi.glob("*_tractogram.trx"))
    assert fa_path.stat().st_uid == uid  # the outputs belong to the user who ran the container
    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated["Version"] == VERSION and generated["Container"] == container


def check_group_outputs(out: Path):
    profiles = out / "group" / "bundles" / "tract_profiles.tsv"
    assert profiles.is_file() and len(profiles.read_text().splitlines()) > 100
    assert any((out / "group" / "tbss").rglob("*.nii.gz"))


def test_version(engine):
    proc = subprocess.run([engine, "run", "--rm", "--network", "none", "--read-only", IMAGE, "--version"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tractoscale {VERSION}", proc.stderr


def test_participant_and_group_read_only_offline_non_root(engine, user, bids, tmp_path):
    uid, gid, _ = user
    out = _owned_folder(tmp_path / "derivatives", uid, gid)
    cache = _owned_folder(tmp_path / "numba", uid, gid)
    proc = run_image(engine, user, bids, out, "participant", *FAST, cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_participant_outputs(out, uid, {"Type": "docker", "Tag": f"tractoscale/tractoscale:{VERSION}"})
    # the group level reads the demo atlas from the read-only bids_dir (sourcedata/groundtruth)
    proc = run_image(engine, user, bids, out, "group", "--tbss-quick", *FAST[:2], "--no-progress", cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_group_outputs(out)


def test_unwritable_output_folder_says_how_to_run_as_yourself(engine, user, bids, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs a folder the image's own uid cannot write: run as root")
    out = tmp_path / "root-owned"
    out.mkdir(mode=0o755)
    proc = run_image(engine, user, bids, out, "participant", "--skip-bids-validation", run_as=False)
    assert proc.returncode == 73, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tractoscale: error: cannot write to output_dir /out")
    assert "uid 10001" in lines[0] and '-u "$(id -u):$(id -g)"' in lines[0]


def bosh_participant(tmp_path: Path, bids: Path, *launch_options: str) -> Path:
    """The README's Boutiques invocation for subject 01, launched in the image; its output folder."""
    from boutiques import bosh
    descriptor = json.loads((ROOT / "boutiques.json").read_text())
    descriptor["container-image"]["image"] = IMAGE
    desc_path = tmp_path / "boutiques.json"
    desc_path.write_text(json.dumps(descriptor))
    out = tmp_path / "derivatives"
    out.mkdir()  # bosh mounts only paths that exist
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps({"bids_dir": str(bids), "output_dir": str(out), "analysis_level": "participant",
                               "participant_label": ["01"], "odf_model": "csa", "tracking": "none",
                               "nthreads": 2, "no_progress": True}))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # bosh mounts the working folder and writes its job script there
    try:
        result = bosh(["exec", "launch", *launch_options, "--skip-data-collection", str(desc_path), str(inv)])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, f"{result.shell_command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.container_location != "" and result.missing_files == []
    fa = np.asarray(nib.load(out / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz").dataobj)
    assert 0.3 < fa.max() <= 1
    assert not (out / "sub-02").exists()
    return out


def test_bosh_exec_launch_in_the_image(engine, bids, tmp_path, monkeypatch):
    """bosh runs `docker run ... IMAGE job.sh`: with podman, a `docker` that calls podman stands in."""
    if engine == "podman":
        shim_dir = tmp_path / "bin"
        shim_dir.mkdir()
        shim = shim_dir / "docker"
        shim.write_text(f'#!/bin/sh\nexec "{shutil.which("podman")}" "$@"\n')
        shim.chmod(0o755)
        monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{os.environ['PATH']}")
    out = bosh_participant(tmp_path, bids, "-u", "--no-pull")
    container = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Container"]
    assert container == {"Type": "docker", "Tag": f"tractoscale/tractoscale:{VERSION}"}


@pytest.mark.skipif(shutil.which("apptainer") is None, reason="no apptainer")
def test_bosh_exec_launch_with_apptainer(bids, tmp_path):
    """bosh runs `apptainer exec --cleanenv ... SIF job.sh`, the job a login shell (#!/bin/sh -l)."""
    if not SIF.is_file():
        pytest.skip(f"no {SIF}: build it with make sif")
    out = bosh_participant(tmp_path, bids, "--force-apptainer", "--imagepath", str(SIF))
    container = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Container"]
    assert container["Type"] == "singularity"


@pytest.mark.skipif(shutil.which("apptainer") is None, reason="no apptainer")
def test_apptainer_run_cleanenv(bids, tmp_path):
    if not SIF.is_file():
        pytest.skip(f"no {SIF}: build it with make sif")
    out = tmp_path / "derivatives"
    out.mkdir()
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()

    def run(*args):
        cmd = ["apptainer", "run", "--cleanenv", "-B", f"{bids}:/data:ro", "-B", f"{out}:/out",
               "-B", f"{private_tmp}:/tmp", str(SIF), "/data", "/out", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)

    proc = run("participant", *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_participant_outputs(out, os.getuid(), {"Type": "singularity", "Tag": f"tractoscale/tractoscale:{VERSION}"})
    proc = run("group", "--tbss-quick", *FAST[:2], "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_group_outputs(out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
