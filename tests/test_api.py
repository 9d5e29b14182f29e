"""The Python tracking API (``kernels.track``): SH bases and frames, seeds, stopping, returned objects."""
import numpy as np
import pytest

from kernels import track
from kernels.errors import ParameterError
from kernels.frames import convert_sh


@pytest.fixture(scope="module")
def phantom():
    """The small demo phantom, oblique LPS with anisotropic voxels, fitted with DIPY's CSA in its
    default basis (descoteaux07, legacy) on voxel-frame b-vectors."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel
    from dipy.reconst.shm import CsaOdfModel

    from bids_app.demo import demo_grid, make_gradients, simulate_subject
    shape, aff = demo_grid("small", orientation="LPS", zooms=(2.5, 2.0, 3.0), oblique_deg=(10.0, -15.0, 20.0))
    bvals, bvecs = make_gradients()
    sub = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=1)
    gtab = gradient_table(bvals, bvecs=bvecs)
    mask = sub.brain_mask
    fa = np.nan_to_num(TensorModel(gtab).fit(sub.dwi, mask=mask).fa).astype(np.float32)
    dipy_sh = CsaOdfModel(gtab, sh_order_max=6, smooth=0.006).fit(sub.dwi, mask=mask).shm_coeff
    return dict(aff=aff, mask=mask, fa=fa, sh=np.nan_to_num(dipy_sh), seeds=(fa > 0.3) & mask)


def _track(p, sh, **kw):
    args = dict(seeds=p["seeds"], stopping=p["fa"] * p["mask"], stop_threshold=0.1, n_seeds=300, rng_seed=4,
                step_size=1.0, device="cpu")
    args.update(kw)
    return track(sh, p["aff"], **args)


def _same_streamlines(a, b):
    assert len(a.streamlines) == len(b.streamlines) > 100
    assert np.array_equal(a.data_per_streamline["seed_index"], b.data_per_streamline["seed_index"])
    for x, y in zip(a.streamlines, b.streamlines):
        assert len(x) == len(y)
        np.testing.assert_allclose(x, y, atol=1e-3)


def test_dipy_basis_gives_the_same_streamlines_as_the_mrtrix_basis(phantom):
    """DIPY's default coefficients and the same ODFs in MRtrix3's basis track identically; read in
    the wrong basis, DIPY's coefficients give other streamlines."""
    mrtrix = convert_sh(phantom["sh"], basis="descoteaux07", legacy=True, frame="voxel", affine=phantom["aff"],
                        to_basis="tournier07", to_legacy=False, to_frame="voxel")
    ours = _track(phantom, phantom["sh"], basis="descoteaux07", frame="voxel")
    theirs = _track(phantom, mrtrix, basis="tournier07", frame="voxel")
    _same_streamlines(ours, theirs)
    misread = _track(phantom, phantom["sh"], basis="tournier07", frame="voxel")
    assert len(misread.streamlines) != len(ours.streamlines) or any(
        len(x) != len(y) or not np.allclose(x, y, atol=1e-3) for x, y in zip(misread.streamlines, ours.streamlines))


def test_world_and_fsl_frames_on_an_oblique_image(phantom):
    """The same ODFs expressed in world axes (MRtrix3) or in the FSL b-vector frame track like the
    voxel-frame original on an oblique, LPS, anisotropic image."""
    ref = _track(phantom, phantom["sh"], basis="descoteaux07", frame="voxel")
    for frame in ("world", "fsl"):
        sh = convert_sh(phantom["sh"], basis="descoteaux07", legacy=True, frame="voxel", affine=phantom["aff"],
                        to_basis="tournier07", to_legacy=False, to_frame=frame)
        _same_streamlines(ref, _track(phantom, sh, basis="tournier07", frame=frame))
    # on this oblique image the world frame is not the voxel frame: mixing them up changes the result
    world = convert_sh(phantom["sh"], basis="descoteaux07", legacy=True, frame="voxel", affine=phantom["aff"],
                       to_frame="world")
    wrong = _track(phantom, world, basis="tournier07", frame="voxel")
    assert len(wrong.streamlines) != len(ref.streamlines) or any(
        len(x) != len(y) or not np.allclose(x, y, atol=1e-3) for x, y in zip(wrong.streamlines, ref.streamlines))


def test_returns_a_stateful_tractogram_in_world_mm(phantom):
    from dipy.io.stateful_tractogram import Space
    seeds_world = np.argwhere(phantom["seeds"])[:50] @ phantom["aff"][:3, :3].T + phantom["aff"][:3, 3]
    sft = track(phantom["sh"], phantom["aff"], basis="descoteaux07", frame="voxel", seeds=seeds_world,
                stopping=phantom["mask"], algorithm="det", step_size=0.5, min_length=5.0, device="cpu")
    assert sft.space == Space.RASMM and len(sft.streamlines) > 20
    np.testing.assert_allclose(sft.affine, phantom["aff"])
    idx = sft.data_per_streamline["seed_index"].ravel()
    for sl, i in zip(sft.streamlines, idx):   # each seed point lies on its streamline
        assert np.linalg.norm(sl - seeds_world[i], axis=1).min() < 1e-3


def test_parameters_are_checked_with_their_names(phantom):
    with pytest.raises(ParameterError, match="frame"):
        _track(phantom, phantom["sh"], basis="descoteaux07", frame="ras")
    with pytest.raises(ParameterError, match="basis"):
        _track(phantom, phantom["sh"], basis="mrtrix", frame="voxel")
    with pytest.raises(ParameterError, match="max_angle"):
        _track(phantom, phantom["sh"], basis="descoteaux07", frame="voxel", max_angle=120)
    with pytest.raises(ParameterError, match="stop_threshold"):
        _track(phantom, phantom["sh"], basis="descoteaux07", frame="voxel", stop_threshold=None)
    with pytest.raises(TypeError):   # the basis and the frame have no default
        track(phantom["sh"], phantom["aff"], seeds=phantom["seeds"], stopping=phantom["mask"])


def test_memory_budget_chooses_the_odf_mode_and_chunks(phantom):
    from kernels.api import TrackingRun
    kw = dict(basis="descoteaux07", frame="voxel", seeds=phantom["seeds"], stopping=phantom["mask"], device="cpu")
    roomy = TrackingRun(phantom["sh"], phantom["aff"], memory_budget=8 << 30, **kw)
    tight = TrackingRun(phantom["sh"], phantom["aff"], memory_budget=1 << 20, **kw)
    assert roomy.data.odf_mode == "sf" and tight.data.odf_mode == "sh"
    assert tight.chunk_size() < roomy.chunk_size()


def test_job_memory_limit_from_slurm(monkeypatch):
    from bids_app.config import Resources
    from bids_app.resources import job_memory_limit, memory_budget
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "2048")
    assert job_memory_limit() <= 2048 << 20
    assert memory_budget(Resources()) <= 2048 << 20
    assert memory_budget(Resources(mem=0.5)) == 1 << 29


def test_readme_example_runs(tmp_path):
    """The README's API example, as written, on the demo subject it names."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT, run_cli
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example:start -->\n```python\n(.*?)```", text, re.S).group(1)
    run_cli("demo-data", tmp_path / "demo" / "bids", "--subjects", "1", check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = int(proc.stdout.split()[0])
    assert n > 100 and (tmp_path / "sub-01_tractogram.trk").stat().st_size > 10000


def test_conversion_keeps_mask_voxels_and_skips_coinciding_frames(phantom):
    """``mask=``: the mask's voxels are converted exactly as without it and the others are 0 (the
    tracking reads the ODF of mask voxels only); frames that coincide (an axis-aligned RAS grid,
    world = voxel) cost no conversion, while an LPS grid's world frame still needs one."""
    from kernels.frames import sh_conversion
    full = convert_sh(phantom["sh"], basis="descoteaux07", legacy=True, frame="voxel", affine=phantom["aff"],
                      to_basis="tournier07", to_frame="world")
    part = convert_sh(phantom["sh"], basis="descoteaux07", legacy=True, frame="voxel", affine=phantom["aff"],
                      to_basis="tournier07", to_frame="world", mask=phantom["mask"])
    assert np.array_equal(part[phantom["mask"]], full[phantom["mask"]])
    assert not part[~phantom["mask"]].any() and full[phantom["mask"]].any()
    with pytest.raises(ParameterError, match="mask"):
        convert_sh(phantom["sh"], basis="tournier07", frame="world", affine=phantom["aff"],
                   mask=phantom["mask"][1:])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    assert sh_conversion(6, basis="tournier07", legacy=False, frame="world", affine=ras) is None
    m = sh_conversion(6, basis="tournier07", legacy=False, frame="world", affine=lps)
    assert m is not None and not np.allclose(m, np.eye(28), atol=1e-3)
    sh = phantom["sh"].astype(np.float32)
    assert np.array_equal(convert_sh(sh, basis="tournier07", frame="world", affine=ras), sh)
