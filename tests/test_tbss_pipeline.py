"""TBSS end to end on the demo phantom: 5 controls + 5 patients (FA reduced in ARC_L).

The cohort comes from ``bids_app.demo.simulate_subject`` (3 mm grid, SNR 30) fitted with
dipy's DTI; sub-03 has no warp (it sits exactly in template space) so it is the most
representative participant.  One run of ``run_tbss`` (auto target, two-sample test on
``group``), then a run on shuffled labels (registrations reused), then a resume test.
"""
import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_app.demo import BUNDLES
from bids_app.errors import NoInputError, UsageError
from bids_app.group.executor import make_executor
from bids_app.group.tbss import run_tbss
from bids_app.group.tbss.synthetic import demo_subject
from conftest import tbss_args

N_PERM = 500


@pytest.fixture(scope="module")
def cohort(tbss_cohort):
    return tbss_cohort


@pytest.fixture(scope="module")
def run1(cohort, tmp_path_factory):
    bids_src, out_src, meta = cohort
    root = tmp_path_factory.mktemp("tbss_e2e")
    bids, out = root / "bids", root / "out"
    shutil.copytree(bids_src, bids)
    shutil.copytree(out_src, out)
    args = tbss_args("--stats-column", "group", "--n-permutations", str(N_PERM), "--tbss-quick")
    with make_executor(2) as ex:
        res = run_tbss(bids_dir=bids, output_dir=out, participants=None, options=args, executor=ex, progress=False)
    return bids, out, meta, res


@pytest.fixture(scope="module")
def target_truth(run1):
    """Ground truth of the chosen target participant (its native grid is the common grid)."""
    _, _, meta, res = run1
    label = res["target"]["Label"]
    idx = [s["label"] for s in meta["subjects"]].index(label.replace("sub-", ""))
    return demo_subject(meta, idx)


def _sig(out, param, contrast):
    d = out / "group" / "tbss"
    p = nib.load(str(d / f"space-tbss_model-tensor_param-{param}_contrast-{contrast}_stat-pfwe_statmap.nii.gz"))
    return np.asarray(p.dataobj) < 0.05


def test_target_is_the_most_representative_real_subject(run1):
    _, out, _, res = run1
    assert res["target"]["Type"] == "participant"
    assert res["target"]["Label"] == "sub-03"          # the undeformed participant
    assert res["n_participants"] == 10 and res["space"] == "tbss"
    table = (out / "group" / "tbss" / "desc-targetscorescoarse_table.tsv").read_text().splitlines()
    assert len(table) == 11 and table[3].startswith("sub-03") and table[3].endswith("\t1")


def test_registration_improves_overlap(run1):
    _, out, _, res = run1
    print(f"mean FA correlation with the target: before {res['mean_corr_before']:.3f}, "
          f"after {res['mean_corr_after']:.3f}")
    assert res["mean_corr_after"] > 0.85
    assert res["mean_corr_after"] > res["mean_corr_before"] + 0.3
    rows = (out / "group" / "tbss" / "space-tbss_desc-skeleton_table.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:6] == ["volume", "participant_id", "session_id", "label", "corr_before",
                                       "corr_after"]
    after = [float(r.split("\t")[5]) for r in rows[1:]]
    assert min(after) > 0.8


def test_skeleton_lies_on_bundle_cores(run1, target_truth):
    _, out, _, res = run1
    skel = nib.load(str(out / "group/tbss/space-tbss_desc-skeleton_mask.nii.gz")).get_fdata() > 0
    masks = target_truth.bundle_masks
    any_bundle = np.any([masks[b] for b in BUNDLES], axis=0)
    assert skel.sum() == res["skeleton_voxels"] > 100
    assert np.mean(any_bundle[skel]) > 0.95
    occ = np.max([target_truth.bundle_fractions[b] for b in BUNDLES], axis=0)
    assert occ[skel].mean() > occ[any_bundle].mean()          # towards the cores, not the edges
    for b in BUNDLES:
        assert (skel & masks[b]).sum() >= 5, b


def test_patient_effect_found_in_arc_l_only(run1, target_truth):
    _, out, _, res = run1
    arc = ndi.binary_dilation(target_truth.bundle_masks["ARC_L"], np.ones((3, 3, 3), bool))
    sig = _sig(out, "fa", "controlGTpatient")
    stats = res["stats"]["results"]
    print("FA controls > patients:", stats["fa:controlGTpatient"])
    assert sig.sum() >= 10
    assert not (sig & ~arc).any()
    assert not _sig(out, "fa", "patientGTcontrol").any()
    # radial diffusivity goes up in the patients' ARC_L
    rd = _sig(out, "rd", "patientGTcontrol")
    assert rd.sum() >= 10 and np.mean(arc[rd]) > 0.9
    # the cluster table lists an ARC_L cluster for FA
    lines = (out / "group/tbss/space-tbss_desc-clusters_table.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    fa_rows = [dict(zip(head, ln.split("\t"))) for ln in lines[1:] if ln.startswith("fa\tcontrolGTpatient")]
    assert fa_rows and float(fa_rows[0]["min_p_fwe"]) < 0.05
    peak = tuple(int(fa_rows[0][k]) for k in ("peak_i", "peak_j", "peak_k"))
    assert arc[peak]


def test_outputs_and_sidecars(run1):
    _, out, _, res = run1
    d = out / "group" / "tbss"
    for name in ("space-tbss_model-tensor_param-fa_desc-mean_dwimap.nii.gz", "space-tbss_desc-brain_mask.nii.gz",
                 "space-tbss_desc-skeleton_distmap.nii.gz",
                 "space-tbss_model-tensor_param-md_desc-skeleton_dwimap.nii.gz"):
        assert (d / name).exists() and (d / name.replace(".nii.gz", ".json")).exists(), name
    four_d = nib.load(str(d / "space-tbss_model-tensor_param-fa_desc-skeleton_dwimap.nii.gz"))
    assert four_d.shape[3] == 10
    side = json.loads((d / "space-tbss_model-tensor_param-fa_desc-skeleton_dwimap.json").read_text())
    assert side["Volumes"][2] == "sub-03" and side["Space"] == "tbss"
    assert not list(d.rglob(".*partial*"))                    # no temporary files left
    xfms = sorted(p.name for p in (d / "xfm").glob("*.nii.gz"))
    assert len(xfms) == 20 and "sub-01_from-native_to-tbss_mode-image_xfm.nii.gz" in xfms


def _copy_run(run1, tmp_path):
    """A private copy of the shared run (tests never change shared fixtures)."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    shutil.copytree(run1[0], bids)
    shutil.copytree(run1[1], out)
    return bids, out


def test_shuffled_labels_find_nothing_and_reuse_registrations(run1, caplog, tmp_path):
    bids, out = _copy_run(run1, tmp_path)
    # balanced shuffle: each pseudo-group holds 2-3 patients, so no true difference
    lines = (bids / "participants.tsv").read_text().splitlines()
    shuffled = ["A", "B", "A", "B", "A", "B", "A", "B", "B", "A"]
    text = [lines[0] + "\tshuffled"] + [ln + f"\t{g}" for ln, g in zip(lines[1:], shuffled)]
    (bids / "participants.tsv").write_text("\n".join(text) + "\n")
    xfm = out / "group/tbss/xfm/sub-01_from-native_to-tbss_mode-image_xfm.nii.gz"
    before = xfm.stat().st_mtime_ns
    args = tbss_args("--stats-column", "shuffled", "--n-permutations", str(N_PERM), "--tbss-quick")
    with caplog.at_level(logging.INFO), make_executor(1) as ex:
        res = run_tbss(bids_dir=bids, output_dir=out, participants=None, options=args, executor=ex, progress=False)
    assert "registrations: 0 to run, 10 reused" in caplog.text
    assert "pair tasks to run" not in caplog.text          # target scores reused too
    assert xfm.stat().st_mtime_ns == before
    for key, r in res["stats"]["results"].items():
        if key.startswith("fa:"):
            assert r["n_significant"] == 0, (key, r)
    assert not _sig(out, "fa", "AGTB").any() and not _sig(out, "fa", "BGTA").any()


def test_rerun_redoes_only_missing_registrations(run1, caplog, tmp_path):
    bids, out = _copy_run(run1, tmp_path)
    xdir = out / "group/tbss/xfm"
    gone = xdir / "sub-07_from-tbss_to-native_mode-image_xfm.nii.gz"
    gone.unlink()
    kept = xdir / "sub-05_from-native_to-tbss_mode-image_xfm.nii.gz"
    before = kept.stat().st_mtime_ns
    args = tbss_args("--tbss-quick")
    with caplog.at_level(logging.INFO), make_executor(1) as ex:
        res = run_tbss(bids_dir=bids, output_dir=out, participants=None, options=args, executor=ex, progress=False)
    assert "registrations: 1 to run, 9 reused" in caplog.text
    assert "coarse all-to-all" not in caplog.text.replace("TBSS target (coarse all-to-all)", "")
    assert gone.exists() and kept.stat().st_mtime_ns == before
    assert res["target"]["Label"] == "sub-03" and "stats" not in res


def test_user_errors(run1, tmp_path):
    bids, out, _, _ = run1
    with make_executor(1) as ex:
        with pytest.raises(UsageError, match="not in participants.tsv"):
            run_tbss(bids_dir=bids, output_dir=out, participants=None, options=tbss_args("--stats-column", "nope"),
                     executor=ex, progress=False)
        with pytest.raises(NoInputError, match="at least 2"):
            run_tbss(bids_dir=bids, output_dir=out, participants=[{"sub": "01"}, {"sub": "77"}],
                     options=tbss_args(), executor=ex, progress=False)
        with pytest.raises(UsageError, match="covariates needs"):
            run_tbss(bids_dir=bids, output_dir=out, participants=None, options=tbss_args("--covariates", "age"),
                     executor=ex, progress=False)
        with pytest.raises(NoInputError, match="no such file"):
            run_tbss(bids_dir=bids, output_dir=out, participants=None,
                     options=tbss_args("--tbss-target", str(tmp_path / "missing_FA.nii.gz")), executor=ex, progress=False)
        with pytest.raises(UsageError, match="not available offline"):
            run_tbss(bids_dir=bids, output_dir=out, participants=None,
                     options=tbss_args("--tbss-target", "NoSuchTemplate"), executor=ex, progress=False)
