"""Participant level through the real CLI on the demo phantom."""
import json
import subprocess

import nibabel as nib
import numpy as np

from bids_app.demo import BUNDLES
from conftest import ROOT, run_cli, tractoscale_cmd

TENSOR_PARAMS = ("fa", "md", "ad", "rd", "tensor", "rgb")


def _gt(demo_bids, sub):
    gt = demo_bids / "sourcedata" / "groundtruth" / f"sub-{sub}"
    bundles = np.asarray(nib.load(gt / f"sub-{sub}_desc-bundles_mask.nii.gz").dataobj) > 0
    gm = np.asarray(nib.load(gt / f"sub-{sub}_label-GM_probseg.nii.gz").dataobj)
    return bundles, gm


def test_bep016_names_and_sidecars(participant_run):
    out, _ = participant_run
    d = out / "sub-01" / "dwi"
    for p in TENSOR_PARAMS:
        f = d / f"sub-01_model-tensor_param-{p}_dwimap.nii.gz"
        assert f.exists(), f
        meta = json.loads(f.with_name(f.name.replace(".nii.gz", ".json")).read_text())
        assert meta["Sources"] == ["bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"]
        assert meta["Model"]["Parameters"]["FitMethod"] == "WLS"
    tensor = json.loads((d / "sub-01_model-tensor_param-tensor_dwimap.json").read_text())
    assert tensor["OrientationEncoding"]["Type"] == "tensor"
    assert nib.load(d / "sub-01_model-tensor_param-tensor_dwimap.nii.gz").shape[-1] == 6
    sh = json.loads((d / "sub-01_model-csa_param-sh_dwimap.json").read_text())
    enc = sh["OrientationEncoding"]
    assert enc["Type"] == "sh" and enc["SphericalHarmonicBasis"] == "MRtrix3"
    n = nib.load(d / "sub-01_model-csa_param-sh_dwimap.nii.gz").shape[-1]
    L = enc["SphericalHarmonicDegree"]
    assert n == (L + 1) * (L + 2) // 2
    assert (d / "sub-01_model-csa_param-gfa_dwimap.nii.gz").exists()
    assert (d / "sub-01_desc-brain_mask.nii.gz").exists()
    assert (out / "sub-01" / "figures" / "sub-01_desc-qc_dwimap.png").exists()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "tractoscale" and desc["GeneratedBy"][0]["Version"]
    assert desc["DatasetLinks"]["raw"].startswith("file://")
    assert list((out / "logs").glob("sub-01_*.log"))
    assert not list(out.rglob(".*partial*"))


def test_fa_matches_phantom(participant_run, demo_bids):
    out, _ = participant_run
    for sub in ("01", "02"):
        fa = np.asarray(nib.load(out / f"sub-{sub}" / "dwi" / f"sub-{sub}_model-tensor_param-fa_dwimap.nii.gz").dataobj)
        bundles, gm = _gt(demo_bids, sub)
        gt = demo_bids / "sourcedata" / "groundtruth" / f"sub-{sub}"
        true_fa = np.asarray(nib.load(gt / f"sub-{sub}_desc-truefa_dwimap.nii.gz").dataobj)
        single = (bundles.sum(-1) == 1) & (true_fa > 0.6)  # single-bundle cores (no partial volume)
        assert single.sum() > 100
        assert np.median(fa[single]) > 0.5
        assert np.median(fa[single]) > np.median(fa[bundles.sum(-1) == 1]) - 0.02
        assert np.median(fa[(gm > 0.9) & ~bundles.any(-1)]) < 0.2
        md = np.asarray(nib.load(out / f"sub-{sub}" / "dwi" / f"sub-{sub}_model-tensor_param-md_dwimap.nii.gz").dataobj)
        assert 0.5e-3 < np.median(md[single]) < 1.2e-3  # mm^2/s, phantom: (1.7 + 2 x 0.25)/3 ~ 0.73e-3


def test_patient_effect_visible_in_fa(participant_run, demo_bids):
    out, _ = participant_run
    effects = json.loads((demo_bids / "sourcedata" / "groundtruth" / "effects.json").read_text())
    bundle = effects["bundle"] if "bundle" in effects else effects.get("patient_bundle")
    k = BUNDLES.index(bundle)
    import pandas as pd
    groups = pd.read_csv(demo_bids / "participants.tsv", sep="\t").set_index("participant_id")["group"]
    medians = {}
    for sub in ("01", "02"):
        fa = np.asarray(nib.load(out / f"sub-{sub}" / "dwi" / f"sub-{sub}_model-tensor_param-fa_dwimap.nii.gz").dataobj)
        bundles, _ = _gt(demo_bids, sub)
        only = bundles[..., k] & (bundles.sum(-1) == 1)
        medians[groups[f"sub-{sub}"]] = np.median(fa[only])
    assert medians["patient"] < medians["control"] - 0.05


def test_rerun_skips_then_force_recomputes(participant_run, demo_bids, tmp_path):
    import shutil
    out = tmp_path / "deriv"
    shutil.copytree(participant_run[0], out)   # tests never change shared fixtures
    fa = out / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz"
    before = fa.stat().st_mtime_ns
    proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", "--odf-model", "csa",
                   "--skip-bids-validation", check=True)
    assert "1 already complete" in proc.stdout
    assert fa.stat().st_mtime_ns == before
    proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", "--odf-model", "csa",
                   "--skip-bids-validation", "--force", "--tracking", "none", check=True)
    assert "1 processed" in proc.stdout
    assert fa.stat().st_mtime_ns > before


def test_changed_model_recomputes_only_that_stage(participant_run, demo_bids, tmp_path):
    import shutil
    out = tmp_path / "deriv"
    shutil.copytree(participant_run[0], out)
    fa = out / "sub-02" / "dwi" / "sub-02_model-tensor_param-fa_dwimap.nii.gz"
    before = fa.stat().st_mtime_ns
    run_cli(demo_bids, out, "participant", "--participant-label", "02", "--odf-model", "opdt",
            "--tracking", "none", "--skip-bids-validation", check=True)
    assert fa.stat().st_mtime_ns == before  # DTI reused
    assert (out / "sub-02" / "dwi" / "sub-02_model-opdt_param-sh_dwimap.nii.gz").exists()


def test_concurrent_participants_share_output_dir(demo_bids, tmp_path):
    out = tmp_path / "deriv"
    env = {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(tractoscale_cmd() + [str(demo_bids), str(out), "participant", "--participant-label",
                                                   s, "--odf-model", "csa", "--tracking", "none",
                                                   "--skip-bids-validation", "--nthreads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, **env}, cwd=ROOT)
             for s in ("01", "02")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert [g["Name"] for g in desc["GeneratedBy"]].count("tractoscale") == 1
    assert len(desc["SourceDatasets"]) == 1
    for s in ("01", "02"):
        assert (out / f"sub-{s}" / "dwi" / f"sub-{s}_model-tensor_param-fa_dwimap.nii.gz").exists()
    assert not list(out.rglob(".*partial*"))


def test_sh_basis_matches_dipy_odf(demo_bids):
    """Our MRtrix3-basis coefficients evaluate to the same ODF as dipy's own fit."""
    from dipy.data import get_sphere
    from dipy.reconst.shm import CsaOdfModel, sh_to_sf

    from bids_app.inputs import load_dwi
    from bids_app.models import fit_odf
    d = demo_bids / "sub-01" / "dwi"
    dwi = load_dwi(d / "sub-01_dwi.nii.gz", d / "sub-01_dwi.bval", d / "sub-01_dwi.bvec")
    mask = np.zeros(dwi.data.shape[:3], bool)
    c = [s // 2 for s in mask.shape]
    mask[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = True
    res = fit_odf(dwi, mask, "csa", None)
    sphere = get_sphere(name="repulsion724")
    ours = sh_to_sf(res.sh[mask], sphere, sh_order_max=res.sh_order, basis_type="tournier07", legacy=False)
    fit = CsaOdfModel(dwi.gtab(), sh_order_max=res.sh_order, smooth=0.006).fit(dwi.data[mask])
    theirs = fit.odf(sphere)
    assert np.allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_principal_direction_matches_truth_for_oblique_anisotropic_las(tmp_path):
    """FSL-convention bvecs on an oblique, LAS, anisotropic image: the tensor's principal axis,
    taken to world space, follows the true fibre direction."""
    from bids_app.demo import simulate_subject
    from bids_app.gradients import voxel_frame, voxel_to_fsl_bvecs
    from bids_app.inputs import load_dwi
    from bids_app.models import fit_dti

    theta = np.deg2rad(12)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    lin = rot @ np.diag([-2.5, 2.5, 3.0])  # LAS-like, oblique, anisotropic
    shape = (40, 48, 24)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ (np.array(shape) / 2)
    from dipy.core.sphere import HemiSphere, disperse_charges
    rng = np.random.default_rng(0)
    h = HemiSphere(xyz=rng.normal(size=(32, 3)))
    h, _ = disperse_charges(h, 200)
    bvecs = np.vstack([np.zeros((3, 3)), h.vertices])
    bvals = np.r_[np.zeros(3), np.full(32, 1000.0)]
    sim = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=3, snr=60)
    nib.save(nib.Nifti1Image(sim.dwi, aff), tmp_path / "dwi.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%d")
    np.savetxt(tmp_path / "dwi.bvec", voxel_to_fsl_bvecs(bvecs, aff).T, fmt="%.6f")
    dwi = load_dwi(tmp_path / "dwi.nii.gz", tmp_path / "dwi.bval", tmp_path / "dwi.bvec")
    mask = np.zeros(shape, bool)
    for m in sim.bundle_masks.values():
        mask |= m
    dti = fit_dti(dwi, mask)
    v1_world = dti.v1 @ voxel_frame(aff).T
    # the straight left-right bundle CC: world direction ~ x
    cc_only = sim.bundle_masks["CC"] & (sum(m.astype(int) for m in sim.bundle_masks.values()) == 1)
    assert cc_only.sum() > 20
    cos = np.abs(v1_world[cc_only] @ np.array([1.0, 0, 0]))
    assert np.median(cos) > 0.9
