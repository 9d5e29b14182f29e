"""The learned-tracker library (kernels.learned): input signal, networks, model files, training, tracking."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kernels.errors import DataError, ModelFileError, ParameterError  # noqa: E402
from kernels.learned.modelfile import Architecture, InputSpec, load_model, read_info, save_model  # noqa: E402
from kernels.learned.nets import build_network  # noqa: E402
from kernels.learned.signal import signal_sh  # noqa: E402

SPEC = InputSpec(sh_order=4, shell=1000.0, neighbourhood_mm=2.5, step_mm=1.25)


# ----------------------------------------------------------------------------- the input signal
def _subject(orientation="RAS", zooms=None, oblique=(0.0, 0.0, 0.0), seed=3):
    from bids_app.demo import demo_grid, make_gradients, simulate_subject
    shape, aff = demo_grid("small", orientation=orientation, zooms=zooms, oblique_deg=oblique)
    bvals, bvecs = make_gradients()
    sub = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=seed, snr=np.inf,
                           deformation=False)
    return sub, bvals, bvecs, aff


def test_signal_is_the_same_in_world_axes_whatever_the_grid():
    """The same tissue on an RAS grid and on an oblique, anisotropic LPS grid gives the same world-frame
    coefficients (sampled at the same world points); in the voxel frame it would not."""
    from kernels.learned.sampling import VolumeSampler
    ras, bvals, bvecs, aff_r = _subject()
    obl, _, bvecs_o, aff_o = _subject("LPS", zooms=(2.5, 2.0, 3.0), oblique=(10.0, -15.0, 20.0))
    sig_r = signal_sh(ras.dwi, bvals, bvecs, aff_r, frame="voxel", sh_order=4)
    sig_o = signal_sh(obl.dwi, bvals, bvecs_o, aff_o, frame="voxel", sh_order=4)
    # world points in voxels of one bundle each: the orientation of the order-2 part (the fibre axis)
    core = sum(m.astype(int) for m in ras.bundle_masks.values()) == 1
    ijk = np.argwhere(core)
    pts = torch.as_tensor(ijk @ aff_r[:3, :3].T + aff_r[:3, 3], dtype=torch.float32)

    def cos_order2(x, y):
        x, y = x[:, 1:6], y[:, 1:6]
        return np.median((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))

    a = VolumeSampler(sig_r, aff_r)(pts).numpy()
    b = VolumeSampler(sig_o, aff_o)(pts).numpy()
    assert len(pts) > 500 and cos_order2(a, b) > 0.999          # measured: 0.99999
    # the same data described with FSL b-vectors give the same coefficients
    from bids_app.gradients import voxel_to_fsl_bvecs
    sig_fsl = signal_sh(obl.dwi, bvals, voxel_to_fsl_bvecs(bvecs_o, aff_o), aff_o, frame="fsl", sh_order=4)
    np.testing.assert_allclose(sig_fsl, sig_o, atol=1e-5)
    # voxel-frame coefficients of the oblique grid would not match (the test tells frames apart)
    from kernels.frames import convert_sh
    vox = convert_sh(sig_o, basis="tournier07", legacy=False, frame="world", affine=aff_o, to_frame="voxel")
    assert cos_order2(a, VolumeSampler(vox, aff_o)(pts).numpy()) < 0.9       # measured: 0.74


def test_signal_checks_shell_and_order():
    sub, bvals, bvecs, aff = _subject()
    with pytest.raises(DataError, match="needs at least 45 directions"):
        signal_sh(sub.dwi, bvals, bvecs, aff, frame="voxel", sh_order=8)      # 32 directions
    with pytest.raises(DataError, match="no b=2000 shell"):
        signal_sh(sub.dwi, bvals, bvecs, aff, frame="voxel", sh_order=4, shell=2000)
    with pytest.raises(ParameterError, match="frame"):
        signal_sh(sub.dwi, bvals, bvecs, aff, frame="ras", sh_order=4)
    sig = signal_sh(sub.dwi, bvals, bvecs, aff, frame="voxel", sh_order=6, mask=sub.brain_mask)
    assert sig.shape == sub.dwi.shape[:3] + (28,) and sig.dtype == np.float32
    assert not sig[~sub.brain_mask].any()
    # S/S0 in [0, 1]: the l=0 coefficient is its mean times sqrt(4 pi)
    c0 = sig[sub.brain_mask, 0] / math.sqrt(4 * math.pi)
    assert 0 < c0.min() and c0.max() <= 1.0


# ----------------------------------------------------------------------------- networks
@pytest.mark.parametrize("kind", ["gru", "transformer"])
@pytest.mark.parametrize("head", ["sphere", "vmf"])
def test_step_by_step_equals_whole_sequence(kind, head):
    """Tracking steps (with a cache and invalid padding steps) give the outputs of training's
    whole-sequence pass."""
    torch.manual_seed(0)
    net = build_network(SPEC, Architecture(kind=kind, head=head, hidden=32, layers=2, heads=4)).eval()
    b, t = 3, 9
    feat = torch.randn(b, t, SPEC.n_features)
    prev = torch.nn.functional.normalize(torch.randn(b, t, 3), dim=-1)
    with torch.no_grad():
        out, eos = net(feat, prev)
        state = net.init_state(b, "cpu", **({"capacity": 4} if kind == "transformer" else {}))
        outs, eoss = [], []
        split = {2: torch.tensor([True, False, True]), 5: torch.tensor([False, True, True])}
        for i in range(t):
            if i in split:   # two calls, each valid for some rows only: the other rows must not change
                m = split[i]
                o1, e1, state = net.step(feat[:, i], prev[:, i], state, m)
                o2, e2, state = net.step(feat[:, i], prev[:, i], state, ~m)
                o, e = torch.where(m[:, None], o1, o2), torch.where(m, e1, e2)
            else:
                o, e, state = net.step(feat[:, i], prev[:, i], state)
            outs.append(o)
            eoss.append(e)
    np.testing.assert_allclose(torch.stack(outs, 1).numpy(), out.numpy(), atol=2e-5)
    np.testing.assert_allclose(torch.stack(eoss, 1).numpy(), eos.numpy(), atol=2e-5)


def test_heads_choose_within_the_cone_and_sample_vmf():
    from kernels.learned.nets import SphereHead, VmfHead, sphere_directions
    dirs = sphere_directions("repulsion724")
    head = SphereHead(8, dirs)
    target = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    logits = 40.0 * (target @ head.dirs.T)              # peaked at the target directions
    prev = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    d, ok = head.choose(logits, prev, math.cos(math.radians(30)), torch.rand(2, 2), sample=False)
    assert ok.tolist() == [True, False]                  # the second peak is 90 deg away
    assert float(d[0] @ target[0]) > 0.999
    d, ok = head.choose(logits, torch.zeros(2, 3), math.cos(math.radians(30)), torch.rand(2, 2), sample=False)
    assert ok.all() and float((d * target).sum(-1).min()) > 0.999       # no previous step: no cone
    vmf = VmfHead(8)
    kappa = 50.0
    out = torch.tensor([[0.0, 0.0, 1.0, math.log(math.expm1(kappa - 1.0))]]).repeat(20000, 1)
    u = torch.rand(20000, 2, generator=torch.Generator().manual_seed(1))
    d, ok = vmf.choose(out, torch.zeros(20000, 3), 0.0, u, sample=True)
    mean_cos = float(d[:, 2].mean())
    assert abs(mean_cos - (1 / math.tanh(kappa) - 1 / kappa)) < 0.002   # E[cos] of a vMF on the sphere
    np.testing.assert_allclose(d.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    assert abs(float(d[:, 0].mean())) < 0.01 and abs(float(d[:, 1].mean())) < 0.01


# ----------------------------------------------------------------------------- model files
@pytest.mark.parametrize("kind, head", [("gru", "sphere"), ("transformer", "vmf")])
def test_model_file_round_trip(tmp_path, kind, head):
    arch = Architecture(kind=kind, head=head, hidden=32, layers=1, heads=2)
    net = build_network(SPEC, arch).eval()
    path = save_model(tmp_path / "m.safetensors", net, SPEC, arch, {"Data": [{"DWI": "x.nii.gz"}]})
    info = read_info(path)
    assert info.inputs == SPEC and info.architecture == arch and info.training["Data"][0]["DWI"] == "x.nii.gz"
    import hashlib
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    again, info2 = load_model(path)
    x, p = torch.randn(2, 5, SPEC.n_features), torch.randn(2, 5, 3)
    with torch.no_grad():
        for a, b in zip(net(x, p), again(x, p)):
            assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*"))                # no temporary file left


def test_bad_model_files_are_refused_without_running_them(tmp_path):
    arch = Architecture(hidden=16, layers=1)
    good = save_model(tmp_path / "good.safetensors", build_network(SPEC, arch), SPEC, arch, {})
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) - 200])
    (tmp_path / "text.safetensors").write_text("not a model")
    # a pickle (torch.save) must never be loaded: safetensors does not unpickle
    torch.save({"x": torch.zeros(2)}, tmp_path / "pickle.pt")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    desc = json.loads(header["__metadata__"]["tractoscale"])
    desc["inputs"]["sh_order"] = 8         # the header no longer matches the weights
    from kernels.learned.modelfile import describe, write_tensors
    from safetensors.torch import load_file
    write_tensors(tmp_path / "mismatch.safetensors", load_file(str(good)),
                  describe(InputSpec(**desc["inputs"]), arch, {}))
    write_tensors(tmp_path / "future.safetensors", load_file(str(good)),
                  json.dumps({**desc, "format_version": 99}))
    for name, words in (("truncated", "not a readable model file"), ("text", "not a readable model file"),
                        ("pickle.pt", "not a readable model file"), ("plain", "not a tractoscale tracker"),
                        ("mismatch", "shape"), ("future", "format version 99"), ("missing", "no such file")):
        path = tmp_path / (name if "." in name else f"{name}.safetensors")
        with pytest.raises(ModelFileError, match=words):
            load_model(path)


# ----------------------------------------------------------------------------- training and tracking
def _straight_bundle():
    """A synthetic 'bundle' along x in a small volume: the signal is a fixed anisotropic profile
    (a prolate tensor along x), reference streamlines are straight lines along x."""
    from kernels.frames import sh_matrix
    from kernels.learned.nets import sphere_directions
    dirs = sphere_directions("repulsion724")
    b = sh_matrix(dirs, 4, "tournier07", False)
    s = np.exp(-1.0 * (0.3 + 1.4 * dirs[:, 0] ** 2))      # S/S0 for a tensor along x (b = 1000)
    coef = np.linalg.lstsq(b, s, rcond=None)[0]
    shape = (24, 12, 12)
    signal = np.zeros(shape + (len(coef),), np.float32)
    signal[2:22, 3:9, 3:9] = coef
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(40):
        y, z = rng.uniform(8, 15, 2)
        x = np.arange(5.0, 41.5, 0.5)          # the signal is there from x = 4 to 42 mm
        lines.append(np.stack([x, np.full_like(x, y), np.full_like(x, z)], 1))
    return signal, aff, lines


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    from kernels.learned.train import TrainingSubject, TrainSettings, train_tracker
    signal, aff, lines = _straight_bundle()
    spec = InputSpec(sh_order=4, shell=1000.0, neighbourhood_mm=2.0, step_mm=1.0)
    arch = Architecture(hidden=16, layers=1)
    subjects = [TrainingSubject(signal, aff, lines)]

    def run(epochs, **kw):
        return train_tracker(subjects, inputs=spec, architecture=arch,
                             settings=TrainSettings(max_epochs=epochs, patience=50, seed=4), **kw)

    full = run(4)
    again = run(4)
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()))
    assert [h["validation_loss"] for h in full.history] == [h["validation_loss"] for h in again.history]
    ckpt = tmp_path / "ckpt.safetensors"
    run(2, checkpoint=ckpt)
    resumed = run(4, checkpoint=ckpt, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))
    with pytest.raises(ParameterError, match="another training settings"):
        train_tracker(subjects, inputs=spec, architecture=arch, settings=TrainSettings(max_epochs=4, seed=5),
                      checkpoint=ckpt, resume=True)
    with pytest.raises(DataError, match="two steps long"):
        train_tracker([TrainingSubject(signal, aff, [lines[0][:2]])], inputs=spec, architecture=arch)


def test_tracker_follows_a_straight_bundle_and_stops_at_its_ends():
    from kernels.learned.api import LearnedTrackingRun
    from kernels.learned.train import TrainingSubject, TrainSettings, train_tracker
    signal, aff, lines = _straight_bundle()
    spec = InputSpec(sh_order=4, shell=1000.0, neighbourhood_mm=2.0, step_mm=1.0)
    arch = Architecture(hidden=32, layers=1)
    res = train_tracker([TrainingSubject(signal, aff, lines)], inputs=spec, architecture=arch,
                        settings=TrainSettings(max_epochs=25, patience=25, learning_rate=5e-3))
    from kernels.learned.modelfile import ModelInfo
    info = ModelInfo(path=None, inputs=spec, architecture=arch)
    seeds = np.stack([np.full(30, 24.0), np.linspace(9, 14, 30), np.linspace(14, 9, 30)], 1)
    mask = np.ones(signal.shape[:3], bool)

    class Run(LearnedTrackingRun):            # the signal is given directly instead of fitted from a DWI
        def __init__(self, **kw):
            from kernels.api import make_seeder
            from kernels.learned.tracker import LearnedParams, LearnedTracker
            self.device, self.network, self.info, self.affine = "cpu", res.model, info, aff
            self.shape = signal.shape[:3]
            self.params = LearnedParams(step_size=1.0, stop_threshold=0.5, min_length=5, **kw)
            self.seeder = make_seeder(seeds, self.shape, aff)
            self.tracker = LearnedTracker(res.model, spec, signal, aff, mask.astype(np.float32), self.params)

    sft = Run().tractogram()
    sls = list(sft.streamlines)
    assert len(sls) == 30
    for s in sls:
        d = np.diff(s, axis=0)
        assert np.abs(d[:, 0]).min() > 0.9                    # every step along x
        # the whole bundle, and no further: the end-of-streamline output stops it (the image goes on
        # to x = 0 and 46 mm, and the stopping mask is the whole image)
        assert 32 < np.ptp(s[:, 0]) < 40 and s[:, 0].min() < 9 and s[:, 0].max() > 37
    sample = [Run(direction="sample", rng_seed=s).tractogram() for s in (1, 1, 2)]
    a, b, c = ([np.asarray(x) for x in t.streamlines] for t in sample)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    small = Run(direction="sample", rng_seed=1).tractogram(chunk_size=7)
    assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(a, small.streamlines))
