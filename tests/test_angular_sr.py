"""Angular super-resolution (--angular-sr): train the demo PCCNN through the real command line on two
multi-shell demo subjects, then on a held-out subject subsampled to 12 of 64 directions per shell CSD
after SR must find the crossing fibres better than CSD on the 12 directions; the participant stage's
outputs; model files in the published layout; bad model files and shells before any work."""
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli

torch = pytest.importorskip("torch")


def _one_line(proc):
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("tractoscale: error:")]
    return len(errors) == 1 and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def demo64(tmp_path_factory):
    """Two training subjects: shells 1000 and 2000 s/mm^2, 64 directions each (seed 0: subjects 1, 2)."""
    from bids_app.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("angsr") / "bids", n_subjects=2, size="small", seed=0,
                             shells=(1000.0, 2000.0), n_directions=64)


@pytest.fixture(scope="module")
def sr_model(demo64, tmp_path_factory):
    model = tmp_path_factory.mktemp("angsr_model") / "pccnn.pt"
    proc = run_cli("train-angular-sr", model, "--from-demo", demo64, "--steps", "150", "--patch", "6",
                   "--nthreads", "2", "--no-progress", check=True)
    assert "PCCNN" in proc.stdout
    return model


@pytest.fixture(scope="module")
def sparse_bids(tmp_path_factory):
    """A subject acquired with 12 directions per shell (1000, 2000)."""
    from bids_app.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("angsr_sparse") / "bids", n_subjects=1, size="small", seed=5,
                             shells=(1000.0, 2000.0), n_directions=12)


# ----------------------------------------------------------------------------- the done-when figure
@pytest.mark.slow
def test_sr_recovers_crossings_better_than_the_subsampled_data(sr_model):
    from bids_app.angular_sr.evaluate import compare
    from bids_app.demo.simulate import demo_grid, make_gradients, simulate_subject

    shape, affine = demo_grid("small", "LAS")
    bvals, bvecs = make_gradients((1000.0, 2000.0), 64, seed=0)
    held_out = simulate_subject(shape=shape, affine=affine, bvals=bvals, bvecs_voxel=bvecs, seed=3)
    r = compare(held_out, sr_model, n_keep=12, n_new=52)
    sub, sr, full = r["subsampled"], r["angular_sr"], r["full"]
    assert r["crossing_voxels"] >= 40, r
    # 12 directions allow order 2 only; acquired + predicted, order 8 like the full data
    assert sub["sh_order"] == 2 and sr["sh_order"] == 8 and full["sh_order"] == 8, r
    # measured (150 steps, MSMT-CSD as the app fits two shells): 37.4 -> 20.7 degrees (full data: 4.7)
    assert sr["median_error_deg"] < sub["median_error_deg"] - 8, r
    assert full["median_error_deg"] < sr["median_error_deg"], r


# ----------------------------------------------------------------------------- the participant stage
@pytest.mark.slow
def test_participant_stage_writes_acquired_plus_predicted(sr_model, sparse_bids, tmp_path):
    out = tmp_path / "deriv"
    args = (sparse_bids, out, "participant", "--skip-bids-validation", "--tracking", "none", "--angular-sr",
            sr_model, "--angular-sr-directions", "20", "--nthreads", "2")
    run_cli(*args, check=True)
    d = out / "sub-01" / "dwi"
    raw = np.asarray(nib.load(str(sparse_bids / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")).dataobj)
    img = nib.load(str(d / "sub-01_desc-angsr_dwi.nii.gz"))
    sr = np.asarray(img.dataobj)
    n = raw.shape[3]
    assert sr.shape == raw.shape[:3] + (n + 40,)
    assert np.array_equal(sr[..., :n], raw)                          # acquired volumes never replaced
    mask = np.asarray(nib.load(str(d / "sub-01_desc-brain_mask.nii.gz")).dataobj) > 0
    pred = sr[..., n:]
    assert np.all(pred[~mask] == 0) and np.all(np.isfinite(pred)) and pred[mask].mean() > 0
    bvals = np.loadtxt(d / "sub-01_desc-angsr_dwi.bval")
    bvecs = np.loadtxt(d / "sub-01_desc-angsr_dwi.bvec")
    raw_b = np.loadtxt(sparse_bids / "sub-01" / "dwi" / "sub-01_dwi.bval")
    assert bvals.shape == (n + 40,) and bvecs.shape == (3, n + 40)
    assert np.array_equal(bvals[:n], raw_b) and sorted(np.unique(bvals[n:])) == [1000, 2000]
    assert np.allclose(np.linalg.norm(bvecs[:, n:], axis=0), 1, atol=1e-5)
    # predicted b=1000 signal close to what the phantom would give: between 0 and the b=0 signal
    b0 = raw[..., raw_b < 50].mean(-1)
    ratio = pred[mask][:, bvals[n:] == 1000].mean(-1) / np.maximum(b0[mask], 1)
    assert 0.1 < np.median(ratio) < 0.9
    side = json.loads((d / "sub-01_desc-angsr_dwi.json").read_text())
    asr = side["AngularSuperResolution"]
    assert asr["Model"]["SHA256"] == hashlib.sha256(sr_model.read_bytes()).hexdigest()
    assert asr["Model"]["Shells"] == [1000.0, 2000.0]
    assert asr["RequestedQSpace"]["DirectionsPerShell"] == 20 and asr["RequestedQSpace"]["Total"] == 40
    assert side["AcquiredVolumes"] == [0, n - 1] and side["PredictedVolumes"] == [n, n + 39]
    # the ODF is fitted on 12 + 20 directions: order 6 (12 alone allow 2)
    odf = json.loads((d / "sub-01_model-csd_param-sh_dwimap.json").read_text())
    assert odf["OrientationEncoding"]["SphericalHarmonicDegree"] == 6
    assert odf["Model"]["Parameters"]["AngularSuperResolution"] == "sub-01_desc-angsr_dwi.json"
    # a rerun skips; another direction count reruns SR and the ODF, not DTI
    assert "1 already complete" in run_cli(*args, check=True).stdout
    fa_before = (d / "sub-01_model-tensor_param-fa_dwimap.nii.gz").stat().st_mtime_ns
    run_cli(*args[:-4], "--angular-sr-directions", "8", "--nthreads", "2", check=True)
    assert nib.load(str(d / "sub-01_desc-angsr_dwi.nii.gz")).shape[3] == n + 16
    assert (d / "sub-01_model-tensor_param-fa_dwimap.nii.gz").stat().st_mtime_ns == fa_before
    # or the volumes of a gradient table: its b=0 rows skipped, its vectors in the input's FSL convention
    grads = tmp_path / "want.bvec"
    v = np.random.default_rng(0).normal(size=(5, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.savetxt(grads, np.vstack([np.zeros((1, 3)), v]).T, fmt="%.6f")
    np.savetxt(tmp_path / "want.bval", [[0, 1000, 1000, 2000, 2000, 1000]], fmt="%d")
    run_cli(*args[:-4], "--angular-sr-gradients", grads, "--nthreads", "2", check=True)
    assert np.array_equal(np.loadtxt(d / "sub-01_desc-angsr_dwi.bval")[n:], [1000, 1000, 2000, 2000, 1000])
    assert np.allclose(np.loadtxt(d / "sub-01_desc-angsr_dwi.bvec")[:, n:], v.T, atol=1e-5)
    side = json.loads((d / "sub-01_desc-angsr_dwi.json").read_text())
    assert side["AngularSuperResolution"]["RequestedQSpace"]["GradientFiles"] == ["want.bval", "want.bvec"]
    # a b-value that was not acquired: stopped before the run's stages (its scale is unknown)
    np.savetxt(tmp_path / "want.bval", [[0, 1000, 1000, 3000, 2000, 1000]], fmt="%d")
    proc = run_cli(*args[:-4], "--angular-sr-gradients", grads, "--force")
    assert proc.returncode == 65 and "requested b-value(s) 3000 are not acquired shells" in proc.stderr
    assert np.loadtxt(d / "sub-01_desc-angsr_dwi.bval")[n:].tolist() == [1000, 1000, 2000, 2000, 1000]


# ----------------------------------------------------------------------------- mistakes, before any work
def test_bad_model_file_is_a_one_line_error(sparse_bids, tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "deriv"
    proc = run_cli(sparse_bids, out, "participant", "--skip-bids-validation", "--angular-sr", bad)
    assert proc.returncode == 65 and _one_line(proc), proc.stderr
    assert "weights.pt" in proc.stderr and "not a readable PyTorch checkpoint" in proc.stderr
    assert not out.exists()
    proc = run_cli(sparse_bids, out, "participant", "--angular-sr", tmp_path / "missing.pt")
    assert proc.returncode == 64 and "--angular-sr" in proc.stderr and _one_line(proc)
    proc = run_cli(sparse_bids, out, "participant", "--angular-sr-directions", "30")
    assert proc.returncode == 64 and "needs --angular-sr" in proc.stderr
    lone = tmp_path / "lone.bvec"
    lone.write_text("1 0 0\n0 1 0\n0 0 1\n")
    proc = run_cli(sparse_bids, out, "participant", "--angular-sr", bad, "--angular-sr-gradients", lone)
    assert proc.returncode == 64 and "lone.bval" in proc.stderr and _one_line(proc)
    proc = run_cli(sparse_bids, out, "participant", "--angular-sr", bad, "--angular-sr-gradients", lone,
                   "--angular-sr-directions", "4")
    assert proc.returncode == 64 and "not allowed with" in proc.stderr
    # a checkpoint of something else
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, str(other))
    proc = run_cli(sparse_bids, out, "participant", "--skip-bids-validation", "--angular-sr", other)
    assert proc.returncode == 65 and "not a PCCNN checkpoint" in proc.stderr and not out.exists()


def test_model_without_the_data_shells_stops_before_any_work(tmp_path):
    from bids_app.angular_sr.modelfile import save_model
    from bids_app.angular_sr.nets import DEMO_HYPER, PCCNNModule
    from bids_app.demo import make_demo_dataset
    model = save_model(tmp_path / "m.pt", PCCNNModule(DEMO_HYPER), shells=(1000.0, 2000.0), patch=6, q_out=10)
    bids = make_demo_dataset(tmp_path / "b3000", n_subjects=1, size="small", shells=(3000.0,), n_directions=12)
    out = tmp_path / "deriv"
    proc = run_cli(bids, out, "participant", "--skip-bids-validation", "--angular-sr", model, "--tracking", "none")
    assert proc.returncode == 65, proc.stderr
    assert "b-value(s) 3000 are not among the model's shells (1000, 2000" in proc.stderr
    assert not list(out.glob("sub-01/dwi/*.nii.gz"))


# ----------------------------------------------------------------------------- model files
def test_published_and_lightning_layouts_load(tmp_path):
    from bids_app.angular_sr.modelfile import ModelFileError, ShellError, load_model
    from bids_app.angular_sr.nets import Hyper, PCCNNModule

    torch.manual_seed(0)
    net = PCCNNModule()                                   # the paper's sizes
    state = net.state_dict()
    assert len(state) == 368 and sum(p.numel() for p in net.parameters()) == 765282
    assert "pccnn.in_blocks.0.pcconv3.pcconv4.feature_layer.weight" in state
    torch.save(state, str(tmp_path / "pccnn_weights.pt"))
    module, info = load_model(tmp_path / "pccnn_weights.pt")
    assert (info.source, info.variant, info.shells, info.patch, info.q_out) == \
        ("published", "pccnn", (1000.0, 2000.0, 3000.0), 10, 10)
    assert info.match_shells([0, 995, 2010, 3000]) == (1000.0, 2000.0, 3000.0)
    with pytest.raises(ShellError, match="5000"):
        info.match_shells([0, 1000, 5000])
    # the loaded network computes what the saved one does
    x = torch.randn(1, 3, 3, 3, 6)
    q = torch.nn.functional.normalize(torch.randn(1, 6, 3), dim=-1)
    qo = torch.nn.functional.normalize(torch.randn(1, 4, 3), dim=-1) * 2
    with torch.no_grad():
        assert torch.allclose(module(x, q, qo), net.eval()(x, q, qo), atol=1e-6)
    torch.save({"state_dict": state, "epoch": 3, "pytorch-lightning_version": "2.1.0"}, str(tmp_path / "last.ckpt"))
    assert load_model(tmp_path / "last.ckpt")[1].source == "lightning"
    bv = PCCNNModule(Hyper(bval_mode="both")).state_dict()
    torch.save(bv, str(tmp_path / "pccnn-bv_weights.pt"))
    assert load_model(tmp_path / "pccnn-bv_weights.pt")[1].variant == "pccnn-bv"
    sp = dict(state)                                       # PCCNN-Sp: 3 more coordinates per weight net
    sp["pccnn.pcconv_in.weight_net.layers.0.weight"] = torch.zeros(64, 240)
    torch.save(sp, str(tmp_path / "pccnn-sp_weights.pt"))
    with pytest.raises(ModelFileError, match="PCCNN-SP"):
        load_model(tmp_path / "pccnn-sp_weights.pt")
    broken = dict(state)
    broken.pop("pccnn.pcconv_out2.bias")
    torch.save(broken, str(tmp_path / "broken.pt"))
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path / "broken.pt")


def test_train_angular_sr_mistakes(tmp_path, sparse_bids):
    proc = run_cli("train-angular-sr", tmp_path / "m.pt")
    assert proc.returncode == 64 and "no training data" in proc.stderr and _one_line(proc)
    proc = run_cli("train-angular-sr", tmp_path / "m.pt", "--from-demo", sparse_bids, "--q-in", "10", "5")
    assert proc.returncode == 64 and "--q-in" in proc.stderr
    proc = run_cli("train-angular-sr", tmp_path / "m.pt", "--from-demo", tmp_path)
    assert proc.returncode == 64 and "not a dataset written by" in proc.stderr
    # 12 directions per shell cannot hold 16 inputs plus targets
    proc = run_cli("train-angular-sr", tmp_path / "m.pt", "--from-demo", sparse_bids, "--steps", "1")
    assert proc.returncode == 65 and "directions on a shell" in proc.stderr and _one_line(proc)
    assert not (tmp_path / "m.pt").exists()
