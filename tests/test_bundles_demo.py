"""Demo-like data: label transfer with ground truth, and the group-level segmentation step."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.errors import NoInputError, NoMatchError, UsageError
from bids_app.config import OT_REACH_DEMO, Segmentation
from bids_app.group.bundles import app, outputs, run_segmentation, synthetic
from bids_app.group.bundles.align import apply_affine
from bids_app.group.bundles.atlas import Atlas
from bids_app.group.bundles.ot import OTParams
from bids_app.group.bundles.segment import segment

DEMO = OTParams(reach=OT_REACH_DEMO)


@pytest.fixture(scope="module")
def atlas():
    return Atlas.from_streamlines(synthetic.template_atlas_bundles()).with_fragments()


@pytest.fixture(scope="module")
def subject():
    return synthetic.demo_like_subject(seed=3, n_spurious=40)


def _scores(labels, truth, names_atlas, names_truth):
    t = np.array([names_atlas.index(names_truth[k]) if k >= 0 else -1 for k in truth])
    ok = t >= 0
    rejected = np.mean(labels[~ok] == -1) if (~ok).any() else 1.0
    return np.mean(labels[ok] == t[ok]), rejected


@pytest.mark.parametrize("mapping", ["true warp", "affine fit"])
def test_ot_labels_bundles_and_rejects_spurious(atlas, subject, mapping):
    from bids_app.group.bundles.align import register_tractograms
    if mapping == "true warp":
        sl = [subject.to_template(s) for s in subject.streamlines]
    else:
        T = register_tractograms(subject.streamlines, atlas.fibres())
        sl = [apply_affine(T, s) for s in subject.streamlines]
    res = {}
    for method in ("ot", "centroid"):
        seg = segment(sl, atlas, method, DEMO)
        res[method] = _scores(seg.labels, subject.truth, atlas.names, subject.names)
    correct, rejected = res["ot"]
    assert correct >= 0.95, res
    assert rejected >= 0.9, res
    assert sum(res["ot"]) >= sum(res["centroid"]), res


def test_partial_streamlines_need_the_atlas_windows(subject):
    """Halves of true fibres: whole-fibre atlas misses many, the windowed atlas labels them."""
    plain = Atlas.from_streamlines(synthetic.template_atlas_bundles())
    tpl = [subject.to_template(s) for s, t in zip(subject.streamlines, subject.truth) if t >= 0]
    truth = subject.truth[subject.truth >= 0]
    halves = [s[: len(s) // 2] for s in tpl]
    acc = {}
    for name, a in (("plain", plain), ("windows", plain.with_fragments())):
        seg = segment(halves, a, "ot", DEMO)
        acc[name] = _scores(seg.labels, truth, a.names, subject.names)[0]
    assert acc["windows"] >= 0.95 and acc["plain"] < 0.8, acc


# --------------------------------------------------------------------------- the group step

def _args(*argv):
    from conftest import group_options
    return group_options(Segmentation, *argv)


@pytest.fixture(scope="module")
def group_run(demo_bids, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "derivatives"
    info = synthetic.participant_outputs_from_demo(demo_bids, out, n_spurious=30)
    res = run_segmentation(bids_dir=demo_bids, output_dir=out, participants=None, options=_args(),
                           executor=None)
    return demo_bids, out, info, res


def test_group_step_outputs_and_accuracy(group_run):
    from trx.trx_file_memmap import load
    bids, out, info, res = group_run
    assert res["participants"] == 2 and res["reused"] == 0
    for sub in info:
        ents = sub["entities"]
        paths = outputs.participant_paths(out, ents, "prob", sub["names"])
        assert paths["bundles"].name == f"sub-{ents['sub']}_track-prob_desc-bundles_tractogram.trx"
        trx = load(str(paths["bundles"]))
        try:
            labels = np.full(len(sub["truth"]), -1)
            src = np.asarray(trx.data_per_streamline["source_index"]).ravel()
            for name, idx in trx.groups.items():
                labels[src[np.asarray(idx)]] = sub["names"].index(name)
        finally:
            trx.close()
        t = sub["truth"]
        assert np.mean(labels[t >= 0] == t[t >= 0]) >= 0.95
        assert np.mean(labels[t < 0] == -1) >= 0.9
        counts = outputs.read_tsv(paths["counts"]).set_index("tract")["streamlines"]
        assert counts["outlier"] == np.sum(labels < 0)
        tract = paths["tracts"]["CST_L"]
        assert tract.name == f"sub-{ents['sub']}_tract-CSTL_track-prob_tractogram.trx"
        meta = json.loads(tract.with_suffix(".json").read_text())
        assert meta["TractName"] == "CST_L" and meta["StreamlineCount"] == counts["CST_L"]
        side = json.loads(paths["bundles"].with_suffix(".json").read_text())
        assert side["MappingToAtlas"][0]["Type"] == "displacement field"


def test_group_profiles_show_the_patient_effect(group_run):
    bids, out, info, res = group_run
    table = outputs.read_tsv(out / "group" / "bundles" / "tract_profiles.tsv")
    assert list(table.columns) == ["subject", "session", "tract", "node", "fa", "md", "ad", "rd"]
    assert (table.groupby(["subject", "tract"]).size() == 100).all()
    groups = dict(pd.read_csv(bids / "participants.tsv", sep="\t").values[:, [0, 3]])
    effect = json.loads((bids / "sourcedata" / "groundtruth" / "effects.json").read_text())
    fa = table.groupby(["tract", "subject"])["fa"].mean().unstack()
    patient = [s for s in fa.columns if groups[f"sub-{s}"] == "patient"][0]
    control = [s for s in fa.columns if groups[f"sub-{s}"] == "control"][0]
    change = 100 * (fa[patient] - fa[control]) / fa[control]
    bundle = effect["bundle"]
    assert change[bundle] < 0.5 * effect["fa_change_percent"]          # at least half the true drop
    assert change.drop(bundle).abs().max() < 5.0
    rd = table.groupby(["tract", "subject"])["rd"].mean().unstack()
    assert rd.loc[bundle, patient] > 1.3 * rd.loc[bundle, control]
    for f in res["figures"] + [str(out / "group" / "bundles" / "figures" / "sub-01_bundles.png")]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_and_errors(group_run, tmp_path):
    import shutil
    bids, out, info, res = group_run
    out = shutil.copytree(out, tmp_path / "derivatives")   # tests never change shared fixtures
    again = run_segmentation(bids_dir=bids, output_dir=out, participants=[{"sub": "01"}], options=_args(),
                             executor=None)
    assert again["reused"] == 1 and again["participants"] == 1
    with pytest.raises(UsageError):
        run_segmentation(bids_dir=bids, output_dir=out, participants=None, options=_args("--ot-blur", "0"),
                         executor=None)
    with pytest.raises(NoInputError):
        run_segmentation(bids_dir=bids, output_dir=out, participants=None,
                         options=_args("--atlas", str(out / "missing.trx")), executor=None)
    with pytest.raises(NoMatchError):
        run_segmentation(bids_dir=bids, output_dir=out, participants=[{"sub": "99"}], options=_args(),
                         executor=None)


def test_group_step_on_an_executor_with_centroids(group_run, tmp_path):
    """The same step as executor tasks (process pool), affine mapping, nearest-centroid method."""
    import shutil
    from bids_app.group.executor import make_executor
    bids, out, info, res = group_run
    work = tmp_path / "derivatives"
    shutil.copytree(out, work, ignore=shutil.ignore_patterns("group"))
    with make_executor(1) as ex:
        r = run_segmentation(bids_dir=bids, output_dir=work, participants=None,
                             options=_args("--seg-method", "centroid", "--seg-transform", "affine"),
                             executor=ex, force=True)
    assert r["reused"] == 0 and r["method"] == "centroid"
    side = json.loads((work / "sub-02" / "dwi" / "sub-02_track-prob_desc-bundles_tractogram.json")
                      .read_text())
    assert side["SegmentationParameters"]["Method"] == "centroid"
    assert [s["Type"] for s in side["MappingToAtlas"]] == ["affine"]
    assert nib.load(str(work / "sub-02" / "dwi" / "sub-02_model-tensor_param-fa_dwimap.nii.gz")).ndim == 3


@pytest.mark.slow
def test_end_to_end_on_tracked_demo(participant_run, demo_bids, tmp_path):
    """Real participant-level tractograms of the demo: streamlines lying in one ground-truth bundle
    (>= 90% of their points in its mask) get that bundle's label; the patient FA drop shows."""
    import shutil
    from trx.trx_file_memmap import load
    from bids_app.demo.phantom import BUNDLES
    from bids_app.group.transforms import sample_image
    out = tmp_path / "derivatives"
    shutil.copytree(participant_run[0], out, ignore=shutil.ignore_patterns("group", "logs"))
    res = run_segmentation(bids_dir=demo_bids, output_dir=out, participants=None, options=_args(), executor=None)
    assert res["participants"] == 2
    for sub in ("01", "02"):
        track = out / f"sub-{sub}" / "dwi" / f"sub-{sub}_track-prob_tractogram.trx"
        sl = app.load_streamlines(track)
        gt = demo_bids / "sourcedata" / "groundtruth" / f"sub-{sub}" / f"sub-{sub}_desc-bundles_mask.nii.gz"
        img = nib.load(str(gt))
        masks = np.asarray(img.dataobj, np.float64)
        frac = np.array([sample_image(masks, img.affine, s, order=0).mean(0) for s in sl])
        inside = frac.max(1) >= 0.9
        truth = np.array([BUNDLES[k] for k in frac.argmax(1)])
        trx = load(str(out / f"sub-{sub}" / "dwi" / f"sub-{sub}_track-prob_desc-bundles_tractogram.trx"))
        try:
            labels = np.full(len(sl), "outlier", dtype=object)
            src = np.asarray(trx.data_per_streamline["source_index"]).ravel()
            for name, idx in trx.groups.items():
                labels[src[np.asarray(idx)]] = name
        finally:
            trx.close()
        assert inside.sum() >= 30
        assert np.mean(labels[inside] == truth[inside]) >= 0.95
    table = outputs.read_tsv(out / "group" / "bundles" / "tract_profiles.tsv")
    fa = table.groupby(["tract", "subject"])["fa"].mean().unstack()
    assert fa.loc["ARC_L", "02"] < 0.9 * fa.loc["ARC_L", "01"]        # sub-02 is the patient


def test_tractogram_formats_and_selection(tmp_path):
    """TCK/TRK participant tractograms are read in RAS+ mm; TRX wins when several formats exist."""
    from nibabel.streamlines import Tractogram
    rng = np.random.default_rng(0)
    sl = [rng.normal(size=(n, 3)).astype(np.float32) * 10 for n in (5, 9, 4)]
    d = tmp_path / "sub-07" / "dwi"
    d.mkdir(parents=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), aff), d / "sub-07_model-tensor_param-fa_dwimap.nii.gz")
    nib.streamlines.save(Tractogram(sl, affine_to_rasmm=np.eye(4)), str(d / "sub-07_track-det_tractogram.tck"))
    jobs = app.find_tractograms(tmp_path, None, "auto")
    assert len(jobs) == 1 and jobs[0]["track"] == "det" and jobs[0]["tractogram"].endswith(".tck")
    back = app.load_streamlines(jobs[0]["tractogram"])
    for a, b in zip(sl, back):
        np.testing.assert_allclose(a, b, atol=1e-4)
    (d / "sub-07_track-det_desc-bundles_tractogram.trx").write_bytes(b"")   # our own output: ignored
    assert len(app.find_tractograms(tmp_path, None, "auto")) == 1
    with pytest.raises(NoInputError):
        app.find_tractograms(tmp_path, None, "prob")


@pytest.mark.parametrize("fmt", ["trx", "tck", "trk"])
def test_group_level_finds_tractograms_in_every_format(tmp_path, fmt):
    """--tractogram-format tck/trk outputs must reach the segmentation step too."""
    from bids_app.workflows.group import has_tractograms as _has_tractograms
    d = tmp_path / "sub-01" / "dwi"
    d.mkdir(parents=True)
    assert not _has_tractograms(tmp_path)
    (d / f"sub-01_track-prob_tractogram.{fmt}").write_bytes(b"")
    assert _has_tractograms(tmp_path)
