"""The demo dataset generator: BIDS validity, signal/FA ground truth, frames, determinism, CLI."""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from scipy import ndimage

from bids_app.demo import BUNDLES, demo_grid, make_demo_dataset, make_gradients, simulate_subject
from bids_app.demo import cli as demo_cli
from bids_app.demo import dataset as demo_dataset
from bids_app.errors import UsageError
from bids_app.gradients import (fsl_to_voxel_bvecs, read_bvals_bvecs, voxel_frame,
                                voxel_to_fsl_bvecs, voxel_to_world_dirs)

GT = Path("sourcedata") / "groundtruth"


@pytest.fixture(scope="module")
def ds4(tmp_path_factory) -> Path:
    """4 subjects (control/patient alternating, RAS/LAS/LAS/RAS grids) with T1w."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo4") / "bids", n_subjects=4, seed=3,
                             t1w=True)


def _load_dwi(root: Path, sub: str):
    d = root / f"sub-{sub}" / "dwi"
    img = nib.load(d / f"sub-{sub}_dwi.nii.gz")
    bvals, bvecs = read_bvals_bvecs(d / f"sub-{sub}_dwi.bval", d / f"sub-{sub}_dwi.bvec")
    return img, bvals, fsl_to_voxel_bvecs(bvecs, img.affine)


@pytest.fixture(scope="module")
def fits(ds4):
    """DTI (WLS) of each written subject, gradients read through fsl_to_voxel_bvecs."""
    out = {}
    for sub in ("01", "02", "03", "04"):
        img, bvals, bvecs = _load_dwi(ds4, sub)
        g = ds4 / GT / f"sub-{sub}"
        masks = np.asarray(nib.load(g / f"sub-{sub}_desc-bundles_mask.nii.gz").dataobj).astype(bool)
        wm = nib.load(g / f"sub-{sub}_label-WM_probseg.nii.gz").get_fdata()
        gm = nib.load(g / f"sub-{sub}_label-GM_probseg.nii.gz").get_fdata()
        brain = (wm + gm) > 0
        fit = TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(
            np.asarray(img.dataobj, dtype=np.float32), mask=brain)
        out[sub] = dict(img=img, fa=fit.fa, evec=fit.evecs[..., 0], masks=masks, wm=wm, gm=gm)
    return out


def _single_bundle_core(masks: np.ndarray, wm: np.ndarray, k: int) -> np.ndarray:
    """Fully-white-matter voxels of bundle k with no other bundle in them or next to them."""
    others = np.delete(masks, k, axis=-1).any(-1)
    return masks[..., k] & (wm >= 0.999) & ~ndimage.binary_dilation(others)


# ----------------------------------------------------------------------------- BIDS validity

def _validator() -> str:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    if exe.exists():
        return str(exe)
    found = shutil.which("bids-validator-deno")
    if not found:
        pytest.fail("bids-validator-deno is not installed (it is a test dependency)")
    return found


def _validate(root: Path) -> dict:
    proc = subprocess.run([_validator(), "--format", "json", str(root)], capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], errors
    return report


def test_small_dataset_passes_bids_validator(ds4):
    report = _validate(ds4)
    assert sorted(report["summary"]["subjects"]) == ["01", "02", "03", "04"]
    assert set(report["summary"]["dataTypes"]) == {"anat", "dwi"}
    groups = [m["group"] for m in sorted(report["summary"]["subjectMetadata"],
                                         key=lambda m: m["participantId"])]
    assert groups == ["control", "patient", "control", "patient"]


def test_top_level_and_ground_truth_files(ds4):
    desc = json.loads((ds4 / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and demo_dataset.is_demo_dataset(ds4)
    rows = [line.split("\t") for line in (ds4 / "participants.tsv").read_text().splitlines()]
    assert rows[0] == ["participant_id", "age", "sex", "group"]
    assert all(float(r[1]) > 0 and r[2] in ("M", "F") for r in rows[1:])
    bundles = [line.split("\t")[1] for line in
               (ds4 / GT / "bundles.tsv").read_text().splitlines()[1:]]
    assert tuple(bundles) == BUNDLES
    eff = json.loads((ds4 / GT / "effects.json").read_text())
    assert eff["bundle"] == "ARC_L" and -25 < eff["fa_change_percent"] < -12
    tdir = ds4 / GT / "template"
    for name in ("tpl-phantom_tractogram.trx", "tpl-phantom_desc-bundles_mask.nii.gz",
                 "tpl-phantom_desc-fa_dwimap.nii.gz"):
        assert (tdir / name).is_file(), name
    for sub in ("01", "02", "03", "04"):
        g = ds4 / GT / f"sub-{sub}"
        for suffix in ("desc-bundles_mask.nii.gz", "label-WM_probseg.nii.gz",
                       "label-GM_probseg.nii.gz", "label-CSF_probseg.nii.gz",
                       "desc-truefa_dwimap.nii.gz", "tractogram.trx",
                       "desc-deformation_xfm.nii.gz", "desc-affine_xfm.json"):
            assert (g / f"sub-{sub}_{suffix}").is_file(), suffix
        m = nib.load(g / f"sub-{sub}_desc-bundles_mask.nii.gz")
        assert m.shape[-1] == len(BUNDLES) and m.get_data_dtype() == np.uint8
        assert (ds4 / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz").is_file()
    # no temporary siblings left behind
    assert [p.name for p in ds4.parent.iterdir()] == ["bids"]


def test_grids_alternate_fsl_flip(ds4):
    dets = [np.linalg.det(nib.load(ds4 / f"sub-{s}" / "dwi" / f"sub-{s}_dwi.nii.gz").affine[:3, :3])
            for s in ("01", "02", "03", "04")]
    assert [d > 0 for d in dets] == [True, False, False, True]


# ----------------------------------------------------------------------------- signal and FA

def test_fa_high_in_single_bundle_cores_low_in_gm(fits):
    for sub, f in fits.items():
        for k, name in enumerate(BUNDLES):
            core = _single_bundle_core(f["masks"], f["wm"], k)
            if name != "U_R":                      # thin bundle: may have no eroded core
                assert core.sum() >= 3, (sub, name)
            if core.any():
                assert f["fa"][core].min() > 0.5, (sub, name, f["fa"][core].min())
        gm = f["gm"] >= 0.999
        assert gm.sum() > 1000
        assert np.median(f["fa"][gm]) < 0.12 and np.percentile(f["fa"][gm], 99) < 0.2


def test_patient_fa_lower_in_arc_l(fits, ds4):
    k = BUNDLES.index("ARC_L")
    mean_fa = {s: f["fa"][_single_bundle_core(f["masks"], f["wm"], k)].mean()
               for s, f in fits.items()}
    controls, patients = [mean_fa["01"], mean_fa["03"]], [mean_fa["02"], mean_fa["04"]]
    assert max(patients) < min(controls)
    drop = 1 - np.mean(patients) / np.mean(controls)
    assert 0.08 < drop < 0.3, drop
    # other bundles unaffected (within noise)
    k2 = BUNDLES.index("CC")
    cc = {s: f["fa"][_single_bundle_core(f["masks"], f["wm"], k2)].mean() for s, f in fits.items()}
    assert abs(np.mean([cc["02"], cc["04"]]) / np.mean([cc["01"], cc["03"]]) - 1) < 0.04
    # the true FA maps agree
    g = ds4 / GT
    tfa = {s: nib.load(g / f"sub-{s}" / f"sub-{s}_desc-truefa_dwimap.nii.gz").get_fdata()
           for s in fits}
    t_core = {s: tfa[s][_single_bundle_core(fits[s]["masks"], fits[s]["wm"], k)].mean()
              for s in fits}
    assert max(t_core["02"], t_core["04"]) < min(t_core["01"], t_core["03"])


def test_written_bvecs_give_true_world_directions(fits, ds4):
    """CC runs left-right, CST up-down, OBL_R off all axes: DTI evecs of the written files (RAS
    and LAS grids, bvecs read through fsl_to_voxel_bvecs) must point that way in world space
    (subject rotations <= 5 degrees plus a smooth warp)."""
    from bids_app.demo.phantom import OBL_DIRECTION
    truth = {"CC": np.array([1.0, 0, 0]), "CST_L": np.array([0, 0, 1.0]),
             "CST_R": np.array([0, 0, 1.0]), "OBL_R": OBL_DIRECTION}
    for sub, f in fits.items():
        aff = f["img"].affine
        for name, d in truth.items():
            core = _single_bundle_core(f["masks"], f["wm"], BUNDLES.index(name))
            world = voxel_to_world_dirs(f["evec"][core], aff)
            assert np.median(np.abs(world @ d)) > np.cos(np.radians(12)), (sub, name)
    # the check is sensitive: the raw .bvec of a det > 0 grid (x not flipped back) gets OBL_R wrong
    img, bvals, _ = _load_dwi(ds4, "01")
    assert np.linalg.det(img.affine[:3, :3]) > 0
    _, raw = read_bvals_bvecs(ds4 / "sub-01/dwi/sub-01_dwi.bval",
                              ds4 / "sub-01/dwi/sub-01_dwi.bvec")
    f = fits["01"]
    core = _single_bundle_core(f["masks"], f["wm"], BUNDLES.index("OBL_R"))
    data = np.asarray(img.dataobj, dtype=np.float32)[core]
    wrong = TensorModel(gradient_table(bvals, bvecs=raw)).fit(data).evecs[..., 0]
    assert np.median(np.abs(voxel_to_world_dirs(wrong, img.affine) @ OBL_DIRECTION)) < 0.8


# ----------------------------------------------------------------------------- geometry

def test_crossings_exist_at_right_angles():
    shape, aff = demo_grid("small")
    bvals, bvecs = make_gradients(n_directions=12)
    sim = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=0,
                           deformation=False, snr=0)
    for a, b, angle in (("CC", "CST_L", 90), ("CC", "CST_R", 90), ("OBL_R", "CST_R", 60)):
        both = (sim.bundle_fractions[a] >= 0.5) & (sim.bundle_fractions[b] >= 0.5)
        assert both.sum() >= 4, (a, b)
        cos = np.abs(np.sum(sim.bundle_dirs[a][both] * sim.bundle_dirs[b][both], -1))
        assert abs(np.degrees(np.arccos(np.median(cos))) - angle) < 8, (a, b)
        # a crossing lowers FA compared with a single-bundle voxel
        single = (sim.bundle_fractions[a] == 1) & (sim.tissue["WM"] == 1)
        single &= sum(sim.bundle_fractions[o] for o in BUNDLES if o != a) == 0
        assert np.median(sim.true_fa[both]) < np.median(sim.true_fa[single]) - 0.15
    # template space: CC along x, CSTs along z
    cc = sim.bundle_fractions["CC"] == 1
    assert np.median(np.abs(sim.bundle_dirs["CC"][cc][:, 0])) > 0.99
    cst = sim.bundle_fractions["CST_L"] == 1
    assert np.median(np.abs(sim.bundle_dirs["CST_L"][cst][:, 2])) > 0.99


def test_fan_widens():
    from bids_app.demo import template_trajectories
    fan = template_trajectories("small")["FAN_L"]
    start = np.array([f[0] for f in fan])
    end = np.array([f[-1] for f in fan])
    mid = np.array([f[len(f) // 4] for f in fan])
    assert np.ptp(end[:, 1]) > 3 * np.ptp(start[:, 1])       # spreads in y
    assert np.ptp(start[:, 1]) <= np.ptp(mid[:, 1]) <= np.ptp(end[:, 1])
    assert abs(np.ptp(end[:, 0]) - np.ptp(start[:, 0])) < 1e-6  # constant thickness
    for other in ("CC", "CST_L"):                            # ordinary tubes do not fan
        fib = template_trajectories("small")[other]
        s = np.array([f[0] for f in fib])
        e = np.array([f[-1] for f in fib])
        assert np.allclose(np.ptp(s, 0), np.ptp(e, 0), atol=0.5)


@pytest.mark.parametrize("orientation,zooms,oblique", [
    ("LAS", (2.0, 2.0, 3.0), (8.0, -6.0, 12.0)),   # oblique, anisotropic, det < 0
    ("LPS", (2.5, 2.0, 3.0), (0.0, 0.0, 0.0)),     # det > 0 with flipped axes
    ("ASR", (2.0, 3.0, 2.5), (5.0, 5.0, 5.0)),     # permuted axes
])
def test_non_ras_subject_direction_matches_truth(orientation, zooms, oblique):
    shape, aff = demo_grid("small", orientation, zooms, oblique, margin_mm=5)
    bvals, bvecs = make_gradients()
    sim = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=5,
                           patient=True)
    assert sim.dwi.dtype == np.float32 and sim.dwi.shape == tuple(shape) + (len(bvals),)
    # the FSL file round trip
    assert np.allclose(fsl_to_voxel_bvecs(voxel_to_fsl_bvecs(bvecs, aff), aff), bvecs)
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(sim.dwi, mask=sim.brain_mask)
    ev_world = voxel_to_world_dirs(fit.evecs[..., 0].reshape(-1, 3), aff).reshape(
        fit.evecs.shape[:3] + (3,))
    others_of = {b: sum(sim.bundle_fractions[o] for o in BUNDLES if o != b) for b in BUNDLES}
    n_checked = 0
    for b in BUNDLES:
        core = (sim.bundle_fractions[b] >= 0.99) & (others_of[b] == 0) & (sim.tissue["WM"] >= 0.99)
        if core.sum() < 3:
            continue
        cos = np.abs(np.sum(ev_world[core] * sim.bundle_dirs[b][core], -1))
        assert np.median(cos) > 0.98, (b, np.median(cos))
        n_checked += 1
    assert n_checked >= 6
    # true streamlines (world mm) run where the signal has that bundle, inside its mask
    inv = np.linalg.inv(aff)
    for b in BUNDLES:
        pts = np.concatenate(sim.streamlines[b])
        ijk = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        assert np.all((ijk >= 0) & (ijk < np.array(shape)))
        ijk = tuple(ijk.T)
        assert np.all(sim.bundle_masks[b][ijk])
        assert (sim.bundle_fractions[b][ijk] >= 0.25).mean() > 0.97, b
        assert np.median(sim.bundle_fractions[b][ijk]) > 0.6, b


def test_warp_inverse_and_template_consistency(ds4):
    from trx.trx_file_memmap import load
    shape, aff = demo_grid("small", demo_dataset.subject_orientation(2))
    bvals, bvecs = make_gradients(seed=3)
    sim = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs,
                           seed=demo_dataset.subject_seed(3, 2), patient=True)
    pts = np.random.default_rng(0).uniform(-40, 40, (500, 3))
    assert np.abs(sim.from_template(sim.to_template(pts)) - pts).max() < 1e-4
    g = ds4 / GT / "sub-02"
    # the written deformation field and affine are those of the simulated subject
    field = nib.load(g / "sub-02_desc-deformation_xfm.nii.gz").get_fdata()
    assert np.allclose(field, sim.deformation_field(), atol=1e-4)
    assert 0.5 < np.abs(field).max() < 15
    xfm = json.loads((g / "sub-02_desc-affine_xfm.json").read_text())
    assert np.allclose(xfm["AffineSubjectToTemplate"], sim.deformation_affine)
    # the written DWI is the API's (rounded to int16)
    dwi = nib.load(ds4 / "sub-02" / "dwi" / "sub-02_dwi.nii.gz")
    assert np.allclose(dwi.affine, aff)
    assert np.abs(np.asarray(dwi.dataobj)[..., :4] - sim.dwi[..., :4]).max() <= 0.5
    # subject TRX mapped to template == template TRX, bundle by bundle
    subj = load(str(g / "sub-02_tractogram.trx"))
    tpl = load(str(ds4 / GT / "template" / "tpl-phantom_tractogram.trx"))
    try:
        assert set(subj.groups) == set(BUNDLES) == set(tpl.groups)
        for b in ("ARC_L", "FAN_L"):
            s_idx, t_idx = np.asarray(subj.groups[b]), np.asarray(tpl.groups[b])
            assert len(s_idx) == len(t_idx) > 5
            s_pts = np.concatenate([subj.streamlines[i] for i in s_idx[:5]])
            t_pts = np.concatenate([tpl.streamlines[i] for i in t_idx[:5]])
            assert np.abs(sim.to_template(s_pts) - t_pts).max() < 1e-3
    finally:
        subj.close()
        tpl.close()


def test_gradients():
    bvals, bvecs = make_gradients(shells=(1000, 2000), n_directions=30)
    assert bvals[0] == 0 and len(bvals) == 60 + 8 and (bvals == 0).sum() == 8
    dw = bvals > 0
    assert np.allclose(np.linalg.norm(bvecs[dw], axis=1), 1)
    assert np.all(bvecs[~dw] == 0)
    for b in (1000, 2000):
        v = bvecs[bvals == b]
        cos = np.abs(v @ v.T)
        np.fill_diagonal(cos, 0)
        assert np.degrees(np.arccos(cos.max())) > 15       # well spread (antipodally)
    aff_ras = np.diag([2.0, 2, 2, 1])
    aff_las = np.diag([-2.0, 2, 2, 1])
    v = np.array([[0.6, 0.8, 0.0]])
    assert np.allclose(voxel_to_fsl_bvecs(v, aff_ras), [[-0.6, 0.8, 0.0]])
    assert np.allclose(voxel_to_fsl_bvecs(v, aff_las), v)
    assert np.allclose(voxel_frame(aff_las), np.diag([-1.0, 1, 1]))


# ----------------------------------------------------------------------------- determinism

def test_deterministic_for_a_seed(ds4, tmp_path):
    again = make_demo_dataset(tmp_path / "again", n_subjects=2, seed=3)
    other = make_demo_dataset(tmp_path / "other", n_subjects=1, seed=4)
    for rel in ("sub-01/dwi/sub-01_dwi.nii.gz", "sub-02/dwi/sub-02_dwi.nii.gz",
                "sourcedata/groundtruth/sub-02/sub-02_desc-deformation_xfm.nii.gz"):
        a = np.asarray(nib.load(ds4 / rel).dataobj)
        b = np.asarray(nib.load(again / rel).dataobj)
        assert np.array_equal(a, b), rel
    for rel in ("sub-01/dwi/sub-01_dwi.bvec", "sub-01/dwi/sub-01_dwi.bval"):
        assert (ds4 / rel).read_text() == (again / rel).read_text()
    assert (ds4 / "participants.tsv").read_text().splitlines()[:3] == \
        (again / "participants.tsv").read_text().splitlines()
    a = np.asarray(nib.load(ds4 / "sub-01/dwi/sub-01_dwi.nii.gz").dataobj)
    c = np.asarray(nib.load(other / "sub-01/dwi/sub-01_dwi.nii.gz").dataobj)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------- sessions, CLI

def _args(*argv):
    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_sessions_and_shells_via_cli(tmp_path):
    out = tmp_path / "ses"
    assert demo_cli.run(_args(out, "--subjects", 2, "--sessions", 2, "--shells", "1000,2000",
                              "--directions", 12, "--seed", 1)) == 0
    for sub in ("01", "02"):
        assert not (out / f"sub-{sub}" / "dwi").exists()
        for ses in ("01", "02"):
            d = out / f"sub-{sub}" / f"ses-{ses}" / "dwi"
            stem = f"sub-{sub}_ses-{ses}_dwi"
            assert {p.name for p in d.iterdir()} == {f"{stem}.{e}" for e in
                                                     ("nii.gz", "bval", "bvec", "json")}
            bvals = np.loadtxt(d / f"{stem}.bval")
            assert sorted(set(bvals)) == [0, 1000, 2000] and len(bvals) == 24 + 3
            g = out / GT / f"sub-{sub}" / f"ses-{ses}"
            assert (g / f"sub-{sub}_ses-{ses}_tractogram.trx").is_file()
        assert not (out / f"sub-{sub}" / "anat").exists()
        # same anatomy, different head pose and noise across sessions
        a1 = json.loads((out / GT / f"sub-{sub}/ses-01/sub-{sub}_ses-01_desc-affine_xfm.json")
                        .read_text())["AffineSubjectToTemplate"]
        a2 = json.loads((out / GT / f"sub-{sub}/ses-02/sub-{sub}_ses-02_desc-affine_xfm.json")
                        .read_text())["AffineSubjectToTemplate"]
        a1, a2 = np.asarray(a1), np.asarray(a2)
        assert not np.allclose(a1, a2)
        assert np.allclose(a1[:3, :3], a2[:3, :3], atol=0.1)      # <= 2 degrees of extra pose
        assert np.abs(a1[:3, 3] - a2[:3, 3]).max() < 5
    report = _validate(out)
    assert sorted(report["summary"]["sessions"]) == ["01", "02"]


def test_t1w_contrast(ds4):
    t1 = nib.load(ds4 / "sub-01" / "anat" / "sub-01_T1w.nii.gz").get_fdata()
    g = ds4 / GT / "sub-01"
    probs = {t: nib.load(g / f"sub-01_label-{t}_probseg.nii.gz").get_fdata()
             for t in ("WM", "GM", "CSF")}
    means = {t: t1[p >= 0.99].mean() for t, p in probs.items()}
    assert means["WM"] > means["GM"] > means["CSF"] > 0


@pytest.mark.parametrize("argv,words", [
    (["--size", "medium"], "size"),
    (["--subjects", "0"], "subjects"),
    (["--subjects", "two"], "subjects"),
    (["--shells", "1000,abc"], "shells"),
    (["--shells", "-5"], "shells"),
    (["--directions", "5"], "directions"),
    (["--snr", "0"], "snr"),
    (["--sessions", "-1"], "sessions"),
])
def test_bad_cli_values_raise_usage_error(tmp_path, argv, words):
    with pytest.raises(UsageError, match=words):
        demo_cli.run(_args(tmp_path / "out", *argv))
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_folder_replaces_demo(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(UsageError, match="not a demo dataset"):
        demo_cli.run(_args(foreign, "--subjects", 1))
    assert (foreign / "thesis.txt").read_text() == "precious"
    out = tmp_path / "demo"
    make_demo_dataset(out, n_subjects=2, n_directions=6)
    make_demo_dataset(out, n_subjects=1, n_directions=6)     # a previous demo: replaced
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("sub-")) == ["sub-01"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "mine"]


def test_crash_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    real = demo_dataset._write_subject
    monkeypatch.setattr(demo_dataset, "_write_subject", boom)
    with pytest.raises(RuntimeError):
        make_demo_dataset(tmp_path / "ds", n_subjects=2, n_directions=6)
    assert list(tmp_path.iterdir()) == []
