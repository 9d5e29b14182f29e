"""Target selection: coarse-first ``auto`` vs full all-to-all, and TemplateFlow targets/spaces offline."""
import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import UsageError
from bids_app.group.executor import make_executor
from bids_app.group.tbss import run_tbss
from bids_app.group.tbss.collect import collect_maps
from bids_app.group.tbss.synthetic import demo_subject
from bids_app.group.tbss.target import select_auto, templateflow_image
from bids_app.group.transforms import grid_points, load_transform
from conftest import tbss_args


@pytest.fixture(scope="module")
def cohort(tbss_cohort):
    return tbss_cohort


def test_coarse_first_auto_equals_full_all_to_all(cohort, tmp_path, caplog):
    _, out, _ = cohort
    found, _, _ = collect_maps(out, [{"sub": f"{i:02d}"} for i in range(1, 6)])
    with make_executor(2) as ex:
        coarse = select_auto(found, ex, out_dir=tmp_path, quick=True)
        full = select_auto(found, ex, out_dir=tmp_path, quick=True, full=True)
        with caplog.at_level(logging.INFO):
            again = select_auto(found, ex, out_dir=tmp_path, quick=True)   # every pair score reused
    assert coarse.label == full.label == "sub-03"        # the participant without a warp
    assert coarse.kind == "participant" and coarse.index == 2
    assert "pair tasks to run" not in caplog.text and again.label == coarse.label
    np.testing.assert_array_equal(again.scores, coarse.scores)
    for s in (coarse.scores, full.scores):
        mean = s.sum(1) / 4
        assert mean[2] < 0.85 * np.delete(mean, 2).min()   # a clear winner, not a near tie
    side = json.loads((tmp_path / "desc-targetscorescoarse_table.json").read_text())
    assert side["Chosen"] == "sub-03"
    assert len(list((tmp_path / "coarse").glob("pair-*_score.json"))) == 10


# ---------------------------------------------------------------------------------------------
# TemplateFlow, offline: a tiny local template folder built from the demo phantom

@pytest.fixture(scope="module")
def local_templateflow(tmp_path_factory, cohort):
    _, _, meta = cohort
    home = tmp_path_factory.mktemp("templateflow")
    tdir = home / "tpl-Phantom"
    tdir.mkdir()
    (tdir / "template_description.json").write_text(json.dumps(
        {"Identifier": "Phantom", "Name": "tractoscale demo phantom (tests)", "res": {"01": {}, "02": {}}}))
    from bids_app.demo import demo_grid, make_gradients, simulate_subject
    b, v = make_gradients()
    for res, zoom in (("01", 2.5), ("02", 3.0)):
        shape, affine = demo_grid("small", zooms=(zoom,) * 3)
        sim = simulate_subject(shape=shape, affine=affine, bvals=b, bvecs_voxel=v, seed=0, deformation=False,
                               snr=0)
        nib.save(nib.Nifti1Image(sim.tissue["WM"].astype(np.float32), affine),
                 tdir / f"tpl-Phantom_res-{res}_label-WM_probseg.nii.gz")
    (tdir / "tpl-Phantom_res-02_desc-brain_mask.nii.gz").write_bytes(b"")   # an unfetched placeholder
    return home


def test_templateflow_lookup_is_offline_and_picks_resolution(local_templateflow, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(local_templateflow))
    assert templateflow_image("Phantom", 3.0).name == "tpl-Phantom_res-02_label-WM_probseg.nii.gz"
    assert templateflow_image("Phantom", 2.0).name == "tpl-Phantom_res-01_label-WM_probseg.nii.gz"
    with pytest.raises(UsageError, match="not available offline.*Phantom"):
        templateflow_image("MNI152NLin2009cAsym", 2.0)


def _truth_error(out, meta, labels, space):
    """Mean distance (mm) between our native -> common point map and the demo's true one."""
    errs, base = [], []
    for lab in labels:
        sim = demo_subject(meta, int(lab) - 1)
        xfm = load_transform(out, {"sub": lab}, space)
        pts = grid_points(sim.true_fa.shape, sim.affine)[sim.true_fa > 0.3]
        truth = sim.to_template(pts)
        errs.append(np.linalg.norm(xfm.points_to_common(pts) - truth, axis=1).mean())
        base.append(np.linalg.norm(pts - truth, axis=1).mean())
    return float(np.mean(errs)), float(np.mean(base))


@pytest.mark.parametrize("mode", ["target", "space"])
def test_template_target_and_space(mode, cohort, local_templateflow, monkeypatch, tmp_path):
    """``--tbss-target Phantom`` registers everyone to the template; ``--tbss-space Phantom`` chains
    auto target -> template.  Either way the saved transforms must follow the demo's true warps."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(local_templateflow))
    bids_src, out_src, meta = cohort
    bids, out = tmp_path / "bids", tmp_path / "out"
    shutil.copytree(bids_src, bids)
    shutil.copytree(out_src, out)
    labels = ["01", "02", "04"]
    argv = ["--tbss-target", "Phantom"] if mode == "target" else ["--tbss-space", "Phantom"]
    with make_executor(2) as ex:
        res = run_tbss(bids_dir=bids, output_dir=out, participants=[{"sub": s} for s in labels],
                       options=tbss_args(*argv, "--tbss-quick"), executor=ex, progress=False)
    assert res["space"] == "Phantom"
    d = out / "group" / "tbss"
    assert (d / "space-Phantom_model-tensor_param-fa_desc-skeleton_dwimap.nii.gz").exists()
    tpl = nib.load(str(local_templateflow / "tpl-Phantom/tpl-Phantom_res-02_label-WM_probseg.nii.gz"))
    mean_fa = nib.load(str(d / "space-Phantom_model-tensor_param-fa_desc-mean_dwimap.nii.gz"))
    assert mean_fa.shape == tpl.shape and np.allclose(mean_fa.affine, tpl.affine)
    if mode == "target":
        assert res["target"]["Type"] == "template"
    else:
        assert res["target"]["Type"] == "participant"
        assert (d / "xfm" / "from-tbss_to-Phantom_mode-image_xfm.nii.gz").exists()
        assert (d / "xfm" / "from-Phantom_to-tbss_mode-image_xfm.nii.gz").exists()
    err, base = _truth_error(out, meta, labels, "Phantom")
    print(f"{mode}: native -> template point error {err:.2f} mm (no registration: {base:.2f} mm)")
    assert err < 2.0 and err < 0.6 * base
