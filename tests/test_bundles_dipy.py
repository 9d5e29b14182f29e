"""Real bundles shipped with DIPY (minimal_bundles.zip): AF_L, CST_R, CC_ForcepsMajor of 5 subjects."""
import numpy as np
import pytest

from bids_app.group.bundles import align, evaluate, fibres, ot
from bids_app.group.bundles.atlas import Atlas
from bids_app.group.bundles.segment import segment


@pytest.fixture(scope="module")
def data():
    if not evaluate.minimal_bundles_path().exists():
        pytest.skip("dipy's minimal_bundles.zip is not installed")
    return evaluate.load_minimal_bundles()


@pytest.fixture(scope="module")
def transforms(data):
    """Label-free alignment of every subject onto sub_1 (no bundle labels used)."""
    return evaluate.align_to(data, "sub_1")


def test_each_subject_is_in_its_own_space(data):
    """Bundle centres move by tens of mm between subjects while their relative layout agrees."""
    centres = {s: np.array([np.concatenate(d[b]).mean(0) for b in evaluate.BUNDLES]) for s, d in data.items()}
    shifts = [np.linalg.norm(centres[s].mean(0) - centres["sub_1"].mean(0)) for s in data]
    layout = [np.abs((centres[s] - centres[s].mean(0)) - (centres["sub_1"] - centres["sub_1"].mean(0))).max()
              for s in data]
    assert max(shifts) > 30.0          # e.g. sub_3 sits ~45 mm away from sub_1
    assert max(layout) < 15.0          # the same anatomy relative to its own centre


def test_alignment_recovers_a_known_affine(data):
    sl, _ = evaluate._flatten(data["sub_2"])
    c, s_ = np.cos(np.radians(12)), np.sin(np.radians(12))
    A = np.eye(4)
    A[:3, :3] = 1.06 * np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
    A[:3, 3] = [25.0, -40.0, 18.0]
    moved = [align.apply_affine(A, f) for f in sl]
    T = align.register_tractograms(moved, sl)
    pts = np.concatenate(moved)
    err = np.linalg.norm(align.apply_affine(T, pts) - np.concatenate(sl), axis=1)
    assert err.mean() < 1.0 and err.max() < 3.0


def test_alignment_is_needed_between_subjects(data, transforms):
    """sub_1 labelled from sub_3 alone: raw coordinates fail, aligned coordinates work."""
    atlas_raw = Atlas.from_streamlines({b: data["sub_3"][b] for b in evaluate.BUNDLES})
    T = transforms["sub_3"]
    atlas_al = Atlas.from_streamlines({b: [align.apply_affine(T, f) for f in data["sub_3"][b]]
                                       for b in evaluate.BUNDLES})
    sl, truth = evaluate._flatten(data["sub_1"])
    raw = segment(sl, atlas_raw, "ot").labels
    aligned = segment(sl, atlas_al, "ot").labels           # sub_1 is the reference space
    assert np.mean(raw == truth) < 0.8
    assert np.mean(aligned == truth) >= 0.95


@pytest.mark.slow
def test_leave_one_subject_out_ot_beats_centroid(data, transforms):
    acc = {}
    for method in ("ot", "centroid"):
        acc[method] = np.array([evaluate.leave_one_out(data, s, method, ot.OTParams(), transforms=transforms)
                                ["accuracy"] for s in sorted(data)])
    assert np.all(acc["ot"] >= 0.90), acc
    assert np.all(acc["ot"] >= acc["centroid"]), acc
    assert acc["ot"].mean() >= 0.98


def test_fibre_vectors_measure_rms_distance(data):
    """The vector norm is the end-point-weighted RMS point distance, in either orientation."""
    f = fibres.resample(data["sub_1"]["AF_L"][:2])
    v = fibres.to_vectors(f)
    w = np.ones(20)
    w[[0, -1]] = 2
    d = np.sqrt(np.sum(w * np.sum((f[0] - f[1]) ** 2, axis=1)) / w.sum())
    assert np.linalg.norm(v[0] - v[1]) == pytest.approx(d)
    d_flip = np.linalg.norm(v[0] - fibres.flip(v[1:2])[0])
    assert fibres.rms_distance(v[:1], fibres.flip(v[1:2]))[0] == pytest.approx(min(d, d_flip))
    np.testing.assert_allclose(fibres.from_vectors(v), f)
