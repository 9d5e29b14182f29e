"""The participant level on real in-vivo scans (Siemens Prisma XA30, 3 mm LAS, one b=2500 shell of 20
directions: ``../shared/realdata/xa30``), checked against DIPY, against the world-frame convention
and, when MRtrix3 is installed, against MRtrix3 reading our files.  Skipped when the scans are absent."""
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, run_cli

XA30 = ROOT.parent / "shared" / "realdata" / "xa30"
pytestmark = pytest.mark.skipif(not (XA30 / "sub-01" / "dwi").is_dir(), reason="real scans not available")


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _meta(path):
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def _unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _eigvec(six):
    xx, yy, zz, xy, xz, yz = np.moveaxis(six.astype(np.float64), -1, 0)
    m = np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)
    return np.linalg.eigh(m)[1][..., -1]


@pytest.fixture(scope="module")
def xa30_run(tmp_path_factory):
    """sub-01 through the real CLI with the defaults (CSD, gradient check auto, probabilistic tracking)."""
    out = tmp_path_factory.mktemp("xa30") / "derivatives"
    run_cli(XA30, out, "participant", "--participant-label", "01", "--skip-bids-validation", "--nthreads", "2",
            "--no-progress", check=True)
    return out / "sub-01" / "dwi"


def _world_gtab(d):
    from dipy.core.gradients import gradient_table

    from bids_app.gradients import voxel_to_world_dirs
    from bids_app.inputs import load_gradients
    aff = nib.load(str(XA30 / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")).affine
    bvals, bvecs = load_gradients(d / "sub-01_dwi.bval", d / "sub-01_dwi.bvec", 21, aff)
    return gradient_table(bvals, bvecs=voxel_to_world_dirs(bvecs, aff), b0_threshold=50)


def test_tensor_is_in_world_axes_as_dipy_fits_it(xa30_run):
    """DIPY fitted with world-frame gradients gives our tensor file, element by element."""
    from dipy.reconst.dti import TensorModel
    d = XA30 / "sub-01" / "dwi"
    mask = _load(xa30_run / "sub-01_desc-brain_mask.nii.gz") > 0
    data = _load(d / "sub-01_dwi.nii.gz").astype(np.float32)[mask]
    fit = TensorModel(_world_gtab(d), fit_method="WLS").fit(data)
    theirs = fit.lower_triangular()[..., (0, 2, 5, 1, 3, 4)]
    tensor = _load(xa30_run / "sub-01_model-tensor_param-tensor_dwimap.nii.gz")[mask]
    assert _meta(xa30_run / "sub-01_model-tensor_param-tensor_dwimap.nii.gz")["OrientationEncoding"]["Reference"] == "xyz"
    wm = fit.fa > 0.3
    assert wm.sum() > 5000
    np.testing.assert_allclose(tensor[wm], theirs[wm], atol=2e-3 * np.abs(theirs[wm]).max())
    cos = np.abs((_eigvec(tensor[wm]) * fit.evecs[wm][..., :, 0]).sum(-1))
    assert np.mean(cos > 0.99) > 0.99


def test_sh_is_in_world_axes_as_dipy_fits_it(xa30_run):
    """DIPY's CSD with world-frame gradients and our response gives our SH file's ODFs (to the soft
    constraint's sampling, which is tied to the gradients' frame), not the voxel-frame fit; the order
    was lowered to 4 (20 directions) and the sidecar says so."""
    from dipy.core.gradients import gradient_table
    from dipy.data import default_sphere
    from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel
    from dipy.reconst.shm import sh_to_sf
    d = XA30 / "sub-01" / "dwi"
    sh_path = xa30_run / "sub-01_model-csd_param-sh_dwimap.nii.gz"
    meta = _meta(sh_path)
    assert meta["OrientationEncoding"]["Reference"] == "xyz"
    assert meta["OrientationEncoding"]["SphericalHarmonicDegree"] == 4
    assert any("SH order lowered from 8 to 4" in s for s in meta["Downgrades"])
    resp = meta["Model"]["Parameters"]["ResponseFunction"]
    response = (np.array(resp["Eigenvalues"]), resp["S0"])
    fa = _load(xa30_run / "sub-01_model-tensor_param-fa_dwimap.nii.gz")
    vox = np.argwhere(fa > 0.4)[::20]
    data = _load(d / "sub-01_dwi.nii.gz").astype(np.float32)[tuple(vox.T)]
    ours = sh_to_sf(_load(sh_path)[tuple(vox.T)], default_sphere, sh_order_max=4, basis_type="tournier07",
                    legacy=False)
    world = _world_gtab(d)
    voxel = gradient_table(world.bvals, bvecs=world.bvecs * [-1, 1, 1], b0_threshold=50)   # LAS: x flipped
    agree = {}
    for name, gtab in (("world", world), ("voxel", voxel)):
        theirs = sh_to_sf(ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=4).fit(data).shm_coeff,
                          default_sphere, sh_order_max=4)
        cos = np.abs((default_sphere.vertices[ours.argmax(1)] * default_sphere.vertices[theirs.argmax(1)]).sum(1))
        agree[name] = float(np.mean(cos > 0.98))
        if name == "world":
            assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()
    assert agree["world"] > 0.97 and agree["voxel"] < 0.7, agree
    dti = _meta(xa30_run / "sub-01_model-tensor_param-fa_dwimap.nii.gz")
    assert any("b=2500" in s for s in dti["Downgrades"])


def test_gradient_check_keeps_the_real_table_and_undoes_an_injected_flip(xa30_run, tmp_path):
    """The scan's own table wins by a clear margin; with the .bvec's x row negated the check finds
    '-x y z', and the outputs equal those of the correct table."""
    check = _meta(xa30_run / "sub-01_model-tensor_param-fa_dwimap.nii.gz")["GradientCheck"]
    assert check["Best"] == check["Applied"] == "x y z"
    lengths = check["MeanStreamlineLength"]
    assert lengths["x y z"] > 1.2 * max(v for k, v in lengths.items() if k != "x y z")
    bids = tmp_path / "bids"
    shutil.copytree(XA30, bids, ignore=shutil.ignore_patterns("sub-02"))
    bvec = bids / "sub-01" / "dwi" / "sub-01_dwi.bvec"
    bvec.chmod(0o644)
    rows = np.loadtxt(bvec)
    rows[0] *= -1
    np.savetxt(bvec, rows, fmt="%.6f")
    out = tmp_path / "derivatives"
    proc = run_cli(bids, out, "participant", "--skip-bids-validation", "--tracking", "none", "--nthreads", "2",
                   "--no-progress", check=True)
    assert "the b-vectors look wrong: '-x y z'" in proc.stderr
    d = out / "sub-01" / "dwi"
    flipped = _meta(d / "sub-01_model-tensor_param-fa_dwimap.nii.gz")["GradientCheck"]
    assert flipped["Best"] == flipped["Applied"] == "-x y z"
    assert "corrected by the gradient check: -x y z" in _meta(d / "sub-01_model-csd_param-sh_dwimap.nii.gz")[
        "GradientTable"]
    for name in ("model-tensor_param-tensor", "model-csd_param-sh"):
        a = _load(d / f"sub-01_{name}_dwimap.nii.gz")
        b = _load(xa30_run / f"sub-01_{name}_dwimap.nii.gz")
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
    # --gradient-check warn reports the flip but keeps the table: principal directions change
    proc = run_cli(bids, tmp_path / "warn", "participant", "--skip-bids-validation", "--tracking", "none",
                   "--gradient-check", "warn", "--odf-model", "csa", "--nthreads", "2", "--no-progress", check=True)
    assert "NOT applied (--gradient-check warn)" in proc.stderr
    warn = _meta(tmp_path / "warn" / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz")
    assert warn["GradientCheck"]["Best"] == "-x y z" and warn["GradientCheck"]["Applied"] == "x y z"


@pytest.mark.skipif(shutil.which("sh2peaks") is None, reason="MRtrix3 not installed")
def test_mrtrix3_reads_our_sh_and_tensor_as_we_do(xa30_run, tmp_path):
    """MRtrix3's sh2peaks and tensor2metric on our files agree with our own peaks and eigenvectors
    (|cos| > 0.95 in > 90% of WM voxels): the files are in the frame and basis MRtrix3 expects."""
    from dipy.data import get_sphere
    from dipy.reconst.shm import sh_to_sf
    sh_path = xa30_run / "sub-01_model-csd_param-sh_dwimap.nii.gz"
    tensor_path = xa30_run / "sub-01_model-tensor_param-tensor_dwimap.nii.gz"
    subprocess.run(["sh2peaks", "-quiet", "-num", "1", str(sh_path), str(tmp_path / "peaks.nii")], check=True)
    subprocess.run(["tensor2metric", "-quiet", "-vector", str(tmp_path / "v1.nii"), str(tensor_path)], check=True)
    wm = _load(xa30_run / "sub-01_model-tensor_param-fa_dwimap.nii.gz") > 0.3
    sphere = get_sphere(name="repulsion724")
    sf = sh_to_sf(_load(sh_path)[wm], sphere, sh_order_max=4, basis_type="tournier07", legacy=False)
    ours_peak = sphere.vertices[sf.argmax(axis=1)]
    theirs_peak = _unit(_load(tmp_path / "peaks.nii")[..., :3][wm])
    cos = np.abs((ours_peak * theirs_peak).sum(-1))
    assert np.mean(cos > 0.95) > 0.9, np.mean(cos > 0.95)
    cos = np.abs((_eigvec(_load(tensor_path)[wm]) * _unit(_load(tmp_path / "v1.nii")[wm])).sum(-1))
    assert np.mean(cos > 0.95) > 0.99


def _csf_share_and_mean_length(tractogram, md_img):
    """Share of streamline points in CSF-like voxels (MD > 2.0e-3 mm^2/s) and mean length (mm)."""
    md = np.asarray(md_img.dataobj)
    t = nib.streamlines.load(str(tractogram)) if not str(tractogram).endswith(".trx") else None
    if t is None:
        from trx.trx_file_memmap import load
        trx = load(str(tractogram))
        pts, lens = np.asarray(trx.streamlines._data, np.float64), np.asarray(trx.streamlines._lengths)
        trx.close()
    else:
        pts, lens = np.asarray(t.streamlines._data, np.float64), np.asarray(t.streamlines._lengths)
    ijk = np.clip(np.rint(nib.affines.apply_affine(np.linalg.inv(md_img.affine), pts)).astype(int), 0,
                  np.array(md.shape) - 1)
    csf = float((md[tuple(ijk.T)] > 2.0e-3).mean())
    cum = np.r_[0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    return csf, float((cum[starts + lens - 1] - cum[starts]).mean())


def test_default_stopping_is_the_fod_rule(xa30_run):
    side = json.loads((xa30_run / "sub-01_track-prob_tractogram.json").read_text())
    term = side["StreamlineTermination"]
    assert term["Method"] == "FA and fibre-ODF peak amplitude" and term["FODCutoff"] == 0.3
    csf, mean_len = _csf_share_and_mean_length(xa30_run / "sub-01_track-prob_tractogram.trx",
                                               nib.load(str(xa30_run / "sub-01_model-tensor_param-md_dwimap.nii.gz")))
    # measured: 0.017% and 70.5 mm (FA > 0.1 alone: 0.165% and 89.5 mm; tckgen iFOD2: 0.02%, 60.1 mm)
    assert csf < 0.0005 and 45 < mean_len < 81


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tckgen") is None, reason="MRtrix3 not installed")
def test_stopping_matches_tckgen_ifod2_on_the_same_seeds_and_mask(xa30_run, tmp_path):
    """MRtrix3's own pipeline (dwi2response tournier, dwi2fod csd, tckgen iFOD2 with its default
    cutoff) on our seed region and brain mask: our share of points in CSF-like voxels is at most 1.5x
    tckgen's, our mean length within +-35% of its."""
    d = XA30 / "sub-01" / "dwi"
    fa_img = nib.load(str(xa30_run / "sub-01_model-tensor_param-fa_dwimap.nii.gz"))
    seeds = np.asarray(fa_img.dataobj) > 0.25
    nib.save(nib.Nifti1Image(seeds.astype(np.uint8), fa_img.affine), tmp_path / "seeds.nii")
    mask = xa30_run / "sub-01_desc-brain_mask.nii.gz"
    run = lambda *a: subprocess.run([*map(str, a), "-quiet", "-nthreads", "2"], check=True, cwd=tmp_path)  # noqa: E731
    run("mrconvert", d / "sub-01_dwi.nii.gz", "dwi.mif", "-fslgrad", d / "sub-01_dwi.bvec", d / "sub-01_dwi.bval")
    run("dwi2response", "tournier", "dwi.mif", "response.txt")
    run("dwi2fod", "csd", "dwi.mif", "-mask", mask, "response.txt", "fod.mif")
    # 5,000 seeds drawn in the same region: enough for a share and a mean (iFOD2 is the test's long pole)
    run("tckgen", "fod.mif", "ifod2.tck", "-algorithm", "iFOD2", "-seed_image", "seeds.nii", "-seeds",
        min(int(seeds.sum()), 5000), "-mask", mask, "-minlength", 10, "-maxlength", 250)
    md = nib.load(str(xa30_run / "sub-01_model-tensor_param-md_dwimap.nii.gz"))
    csf_ref, len_ref = _csf_share_and_mean_length(tmp_path / "ifod2.tck", md)
    csf, mean_len = _csf_share_and_mean_length(xa30_run / "sub-01_track-prob_tractogram.trx", md)
    assert csf <= max(1.5 * csf_ref, 1e-4), (csf, csf_ref)
    assert abs(mean_len - len_ref) <= 0.35 * len_ref, (mean_len, len_ref)
