"""TBSS building blocks: preprocessing, skeleton, projection, transforms, GLM, design, collection."""
import gzip
import logging

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats as sps

from bids_app.errors import InputDataError, NoInputError, UsageError
from bids_app.group.transforms import DisplacementField, SubjectTransform, grid_points, load_transform
from bids_app.group.tbss.collect import collect_maps
from bids_app.group.tbss.preprocess import preprocess_fa
from bids_app.group.tbss.skeleton import OFFSETS, distance_map, project, skeletonise
from bids_app.group.tbss.stats import build_design, clusters_table, permutation_glm
from bids_app.group.tbss.synthetic import Phantom, make_cohort, world_coords, write_cohort
from kernels.tfce import neighbour_graph


# ---------------------------------------------------------------------------------------------
# preprocessing

def test_preprocess_clamps_erodes_and_zeroes_end_slices():
    fa = np.zeros((10, 10, 10), np.float32)
    fa[1:9, 1:9, 1:9] = 0.5
    fa[3, 3, 3] = 1.7
    fa[5, 5, 5] = np.nan
    out = preprocess_fa(fa)
    assert out.max() == 1.0 and out[3, 3, 3] == 1.0 and np.isfinite(out).all()
    # one box erosion: the 8^3 cube becomes 6^3, and the NaN voxel's neighbours are eroded too
    assert out[1].sum() == 0 and out[:, 1].sum() == 0 and out[2, 2, 2] == 0.5 and out[7, 7, 7] == 0.5
    assert out[5, 5, 5] == 0 and out[4, 4, 4] == 0 and out[6, 6, 6] == 0 and out[2, 7, 2] == 0.5
    full = np.full((6, 6, 6), 0.4, np.float32)
    p = preprocess_fa(full)
    for axis in range(3):
        assert not np.take(p, 0, axis).any() and not np.take(p, -1, axis).any()
    assert p[1:5, 1:5, 1:5].min() == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------
# skeleton

@pytest.fixture(scope="module")
def phantom():
    ph = Phantom()
    fa = ph.template_fa()
    return ph, fa, fa > 0


def test_offsets_are_the_13_half_neighbourhood_directions():
    as_set = {tuple(o) for o in OFFSETS}
    assert len(as_set) == 13
    assert not as_set & {tuple(-o) for o in OFFSETS}


def test_skeleton_lies_on_bundle_cores_and_is_thin(phantom):
    ph, fa, mask = phantom
    skel, dirs = skeletonise(fa, mask)
    skel &= fa >= 0.2
    w = ph.weights(world_coords(ph.shape, ph.affine))
    core = np.maximum.reduce(list(w.values()))
    # every skeleton voxel is within 1.5 voxels (4.5 mm) of a centre line: weight >= exp(-2);
    # on tubes the skeleton is a ribbon (suppression acts across one direction only), so some
    # voxels sit one voxel to the side of the line
    assert core[skel].min() >= np.exp(-2.0)
    assert np.mean(core[skel] >= 0.35) > 0.95
    tubes = (core > 0.2) & mask
    assert fa[skel].mean() > np.percentile(fa[tubes], 60)
    near = ndi.binary_dilation(skel, np.ones((3, 3, 3), bool))
    for name, wn in w.items():
        centre = (wn > 0.9) & mask
        assert centre.any()
        assert np.mean(near[centre]) > 0.9, name            # the core is covered
        tube = (wn > 0.2) & mask
        assert (skel & tube).sum() < 0.6 * tube.sum(), name  # and the skeleton is thinner than the tube
    assert (dirs[skel] >= 0).all()


def test_projection_recovers_a_shifted_ridge(phantom):
    ph, fa, mask = phantom
    skel, dirs = skeletonise(fa, mask)
    skel &= fa >= 0.2
    dist = distance_map(skel, mask)
    assert dist[skel].max() == 0 and dist[~mask].max() == 0 and dist[mask & ~skel].min() >= 1
    vox = np.argwhere(skel)
    base, where = project(fa, vox, dirs, dist)
    np.testing.assert_allclose(base, fa[skel])           # on the ridge the skeleton keeps its own value
    np.testing.assert_array_equal(where, np.ravel_multi_index(tuple(vox.T), fa.shape))
    # a subject whose tracts sit one voxel off: projection finds the ridge values again
    shifted = np.roll(fa, 1, axis=0)
    vals, where2 = project(shifted, vox, dirs, dist)
    at_skel = shifted[skel]
    assert vals.mean() > at_skel.mean() + 0.03
    assert np.median(np.abs(vals - base)) < 0.05
    # other maps are read where FA was taken
    other = np.arange(fa.size, dtype=float).reshape(fa.shape)
    np.testing.assert_array_equal(other.ravel()[where2], where2)


# ---------------------------------------------------------------------------------------------
# transforms: directions checked against the demo's analytic ground-truth deformation

@pytest.fixture(scope="module")
def demo_pair():
    """Two demo subjects (template-space one and a deformed one) with DTI-fitted FA (``.fa``)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    from bids_app.demo import demo_grid, make_gradients, simulate_subject
    shape, affine = demo_grid("small", zooms=(3.0, 3.0, 3.0))
    b, v = make_gradients()
    model = TensorModel(gradient_table(b, bvecs=v))
    out = []
    for seed, deformed in ((5, False), (6, True)):
        sim = simulate_subject(shape=shape, affine=affine, bvals=b, bvecs_voxel=v, seed=seed, deformation=deformed)
        sim.fa = (np.nan_to_num(model.fit(sim.dwi, mask=sim.brain_mask).fa) * sim.brain_mask).astype(np.float32)
        out.append(sim)
    return tuple(out)


def test_transform_conventions_with_known_deformation(demo_pair, tmp_path):
    tpl, sub = demo_pair
    # native grid: the subject's; common grid: the template's (here the same layout)
    to_native = DisplacementField.from_function(sub.from_template, tpl.true_fa.shape, tpl.affine)
    to_common = DisplacementField.from_function(sub.to_template, sub.true_fa.shape, sub.affine)
    xfm = SubjectTransform({"sub": "06"}, "phantom", to_native, to_common)
    xfm.save(tmp_path)
    loaded = load_transform(tmp_path, {"sub": "06"})
    assert loaded.space == "phantom"
    brain = sub.brain_mask & (sub.true_fa > 0.2)
    pts = grid_points(sub.true_fa.shape, sub.affine)[brain] + 0.37  # off-grid points
    truth = sub.to_template(pts)
    assert np.abs(pts - truth).max() > 2.0                         # a real deformation
    assert np.abs(loaded.points_to_common(pts) - truth).max() < 0.05
    back = loaded.points_to_native(loaded.points_to_common(pts))
    assert np.abs(back - pts).max() < 0.05
    # a native image resampled to common space matches the template-space image
    warped = loaded.image_to_common(sub.true_fa, sub.affine)
    inside = tpl.brain_mask
    assert np.corrcoef(warped[inside], tpl.true_fa[inside])[0, 1] > 0.95
    assert np.corrcoef(sub.true_fa[inside], tpl.true_fa[inside])[0, 1] < 0.8
    # bundle masks pushed to native space land on the subject's own masks
    mask_native = loaded.image_to_native(tpl.bundle_masks["ARC_L"].astype(np.float32), order=0) > 0.5
    own = sub.bundle_masks["ARC_L"]
    dice = 2 * (mask_native & own).sum() / (mask_native.sum() + own.sum())
    assert dice > 0.7


def test_registration_recovers_the_demo_deformation(demo_pair, tmp_path):
    """dipy registration -> our fields: points move the right way (native -> template)."""
    from bids_app.group.tbss.register import register_arrays, settings, transform_from_mapping
    tpl, sub = demo_pair
    static, moving = preprocess_fa(tpl.fa), preprocess_fa(sub.fa)
    affine, mapping = register_arrays(static, tpl.affine, moving, sub.affine, settings("full", quick=True))
    xfm = transform_from_mapping(mapping, static.shape, tpl.affine, moving.shape, sub.affine, {"sub": "06"}, "x")
    pts = grid_points(sub.fa.shape, sub.affine)[sub.true_fa > 0.3]
    truth = sub.to_template(pts)
    err = np.linalg.norm(xfm.points_to_common(pts) - truth, axis=1)
    err0 = np.linalg.norm(pts - truth, axis=1)
    assert err.mean() < 0.5 * err0.mean() and err.mean() < 2.0
    # dipy's own image warp agrees with our pull field
    ours = xfm.image_to_common(moving, sub.affine)
    np.testing.assert_allclose(ours[static > 0], mapping.transform(moving)[static > 0], atol=0.02)


def test_load_transform_errors(tmp_path):
    with pytest.raises(NoInputError):
        load_transform(tmp_path, {"sub": "01"})
    ident = DisplacementField.identity((4, 4, 4), np.eye(4))
    for space in ("a", "b"):
        SubjectTransform({"sub": "01"}, space, ident, ident).save(tmp_path)
    with pytest.raises(InputDataError):
        load_transform(tmp_path, {"sub": "01"})
    assert load_transform(tmp_path, {"sub": "01"}, space="b").space == "b"


# ---------------------------------------------------------------------------------------------
# GLM and permutations

def _chain_graph(n):
    mask = np.zeros((n, 1, 1), bool)
    mask[:] = True
    return neighbour_graph(mask)


def test_glm_t_matches_scipy_two_sample_and_correlation():
    rng = np.random.default_rng(0)
    n, V = 14, 30
    Y = rng.standard_normal((n, V))
    _, ip, ix = _chain_graph(V)
    g = np.array([1.0] * 6 + [0.0] * 8)
    X = np.stack([g, np.ones(n)], 1)
    res = permutation_glm(Y, X, ip, ix, n_permutations=10)
    np.testing.assert_allclose(res.t, sps.ttest_ind(Y[g == 1], Y[g == 0]).statistic, rtol=1e-10)
    age = rng.uniform(20, 60, n)
    X = np.stack([age - age.mean(), np.ones(n)], 1)
    res = permutation_glm(Y, X, ip, ix, n_permutations=10)
    r = np.array([sps.pearsonr(age, Y[:, v]).statistic for v in range(V)])
    np.testing.assert_allclose(res.t, r * np.sqrt((n - 2) / (1 - r ** 2)), rtol=1e-10)
    # with a covariate: the OLS t of column 0
    cov = rng.standard_normal(n)
    X = np.stack([g, np.ones(n), cov], 1)
    res = permutation_glm(Y, X, ip, ix, n_permutations=10)
    beta, *_ = np.linalg.lstsq(X, Y, rcond=None)
    resid = Y - X @ beta
    se = np.sqrt((resid ** 2).sum(0) / (n - 3) * np.linalg.inv(X.T @ X)[0, 0])
    np.testing.assert_allclose(res.t, beta[0] / se, rtol=1e-10)


def test_permutation_fwe_finds_the_effect_only_where_it_is():
    rng = np.random.default_rng(1)
    n, V = 16, 60
    _, ip, ix = _chain_graph(V)
    g = np.array([1.0] * 8 + [0.0] * 8)
    Y = rng.standard_normal((n, V))
    Y[:, 20:30] += 2.0 * g[:, None]
    X = np.stack([g, np.ones(n)], 1)
    res = permutation_glm(Y, X, ip, ix, n_permutations=500, seed=3)
    p = res.p_fwe[1.0]
    assert (p[20:30] < 0.05).sum() >= 8
    assert (np.delete(p, np.arange(18, 32)) >= 0.05).all()
    assert (res.p_fwe[-1.0] >= 0.05).all()                  # nothing in the other direction
    assert res.max_null[1.0][0] == pytest.approx(res.tfce[1.0].max())  # first permutation = identity
    vox = np.argwhere(np.ones((V, 1, 1), bool))
    table = clusters_table(p, res.t, res.tfce[1.0], vox, np.eye(4), ip, ix)
    assert len(table) >= 1 and 20 <= table[0]["peak_i"] < 30 and table[0]["min_p_fwe"] < 0.05


def test_permutation_fwe_rate_is_controlled_under_the_null():
    """Pure-noise data: a family-wise false positive in about 5% of data sets, not more."""
    rng = np.random.default_rng(11)
    n, V, sets = 12, 40, 80
    _, ip, ix = _chain_graph(V)
    X = np.stack([np.array([1.0] * 6 + [0.0] * 6), np.ones(n)], 1)
    hits = 0
    for k in range(sets):
        Y = ndi.gaussian_filter1d(rng.standard_normal((n, V)), 1.5, axis=1)  # spatially smooth noise
        res = permutation_glm(Y, X, ip, ix, n_permutations=200, seed=k)
        hits += res.p_fwe[1.0].min() < 0.05
    # expected 4 of 80; P(X >= 11) < 0.002 for a correct 5% test
    assert hits <= 10


# ---------------------------------------------------------------------------------------------
# design from participants.tsv

def _tsv(tmp_path, text):
    (tmp_path / "participants.tsv").write_text(text)
    return tmp_path


def test_design_kinds_and_errors(tmp_path, caplog):
    b = _tsv(tmp_path, "participant_id\tgroup\tage\tsite\tonly\tcolour\n"
                       "sub-01\tctl\t30\tA\tx\tred\nsub-02\tpat\t40\tB\tx\tblue\nsub-03\tctl\tn/a\tA\tx\tgreen\n"
                       "sub-04\tpat\t50\tB\tx\tred\nsub-05\tctl\t35\tA\tx\tred\n")
    ids = ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-09"]
    d = build_design(b, ids, "group")
    assert d.kind == "two-sample" and d.levels == ["ctl", "pat"]
    assert [c for c, _ in d.contrasts] == ["ctlGTpat", "patGTctl"] and d.rows == [0, 1, 2, 3, 4]
    assert any("sub-09" in m for m in d.dropped)
    with caplog.at_level(logging.WARNING):
        d = build_design(b, ids, "age", ["site"])
    assert d.kind == "correlation" and d.rows == [0, 1, 3, 4] and d.names == ["age", "intercept", "site[B]"]
    assert "sub-03: no value for age" in caplog.text
    with pytest.raises(UsageError, match="not in participants.tsv"):
        build_design(b, ids, "weight")
    with pytest.raises(UsageError, match="one level"):
        build_design(b, ids, "only")
    with pytest.raises(UsageError, match="3 levels"):
        build_design(b, ids, "colour")
    with pytest.raises(UsageError, match="rank deficient"):
        build_design(b, ids, "age", ["site", "group"])
    with pytest.raises(NoInputError):
        build_design(tmp_path / "nowhere", ids, "group")


# ---------------------------------------------------------------------------------------------
# collecting participant maps

def test_collect_reports_and_leaves_out_bad_participants(tmp_path, caplog):
    _, subs = make_cohort(2, 2, phantom=Phantom(shape=(12, 12, 10), voxel_size=6.0), seed=0)
    write_cohort(tmp_path / "bids", tmp_path / "out", subs)
    out = tmp_path / "out"
    found, scalars, problems = collect_maps(out)
    assert [p.label for p in found] == ["sub-01", "sub-02", "sub-03", "sub-04"] and scalars == ["fa", "md", "ad", "rd"]
    # corrupt FA, missing MD, a selected participant without outputs
    fa2 = out / "sub-02/dwi/sub-02_model-tensor_param-fa_dwimap.nii.gz"
    fa2.write_bytes(gzip.compress(b"not a nifti"))
    (out / "sub-03/dwi/sub-03_model-tensor_param-md_dwimap.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        found, scalars, problems = collect_maps(out, [{"sub": s} for s in ("01", "02", "03", "04", "07")])
    assert [p.label for p in found] == ["sub-01", "sub-04"]
    text = " ".join(problems)
    assert "sub-02: FA map" in text and "sub-03: MD missing" in text and "sub-07: no FA map" in text
    assert "sub-07" in caplog.text
    with pytest.raises(NoInputError, match="at least 2"):
        collect_maps(out, [{"sub": "01"}, {"sub": "02"}])
    # a map with the wrong shape is rejected too
    img = nib.load(str(out / "sub-04/dwi/sub-04_model-tensor_param-fa_dwimap.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), img.affine),
             out / "sub-04/dwi/sub-04_model-tensor_param-rd_dwimap.nii.gz")
    with pytest.raises(NoInputError):
        collect_maps(out)
