"""Input discovery with pybids: sessions, runs, inherited gradients, preprocessed derivatives."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_app.discovery import discover, load_filter_file, select_subjects
from bids_app.errors import NoMatchError, UsageError
from conftest import run_cli


@pytest.fixture(scope="module")
def sessions_dataset(tmp_path_factory):
    """Two sessions per subject; sub-01 ses-01 gets a second run; gradients inherited from the root."""
    from bids_app.demo import make_demo_dataset
    root = make_demo_dataset(tmp_path_factory.mktemp("ses") / "bids", n_subjects=2, size="small", seed=5,
                             sessions=2)
    d = root / "sub-01" / "ses-01" / "dwi"
    for ext in (".nii.gz", ".json", ".bval", ".bvec"):
        shutil.copy(d / f"sub-01_ses-01_dwi{ext}", d / f"sub-01_ses-01_run-2_dwi{ext}")
        (d / f"sub-01_ses-01_dwi{ext}").rename(d / f"sub-01_ses-01_run-1_dwi{ext}")
    # inheritance: one top-level bval/bvec for everyone, per-file ones removed
    first = next(root.glob("sub-02/ses-01/dwi/*_dwi.bval"))
    shutil.copy(first, root / "dwi.bval")
    shutil.copy(first.with_suffix(".bvec"), root / "dwi.bvec")
    for f in list(root.glob("sub-02/**/*_dwi.bval")) + list(root.glob("sub-02/**/*_dwi.bvec")):
        f.unlink()
    return root


def test_sessions_runs_and_inherited_gradients(sessions_dataset, tmp_path):
    inputs = discover(sessions_dataset, ["01", "02"], database_dir=tmp_path / "db")
    labels = sorted(i.label for i in inputs)
    assert labels == ["sub-01_ses-01_run-1", "sub-01_ses-01_run-2", "sub-01_ses-02", "sub-02_ses-01",
                      "sub-02_ses-02"]
    sub2 = [i for i in inputs if i.entities["sub"] == "02"]
    assert all(i.bval == sessions_dataset / "dwi.bval" for i in sub2)
    sub1 = [i for i in inputs if i.entities["sub"] == "01"]
    assert all(i.bval.parent == i.dwi.parent for i in sub1)
    assert all(i.metadata.get("PhaseEncodingDirection") for i in inputs)  # sidecar metadata read


def test_session_selection_and_unknown_session(sessions_dataset, tmp_path):
    inputs = discover(sessions_dataset, ["02"], sessions=["02"], database_dir=tmp_path / "db")
    assert [i.label for i in inputs] == ["sub-02_ses-02"]
    with pytest.raises(NoMatchError, match="unknown session"):     # exit 18, as the README says
        discover(sessions_dataset, ["02"], sessions=["09"], database_dir=tmp_path / "db2")


def test_filter_file(sessions_dataset, tmp_path):
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"dwi": {"run": 2}}))
    inputs = discover(sessions_dataset, ["01"], filters=load_filter_file(f), database_dir=tmp_path / "db")
    assert [i.label for i in inputs] == ["sub-01_ses-01_run-2"]
    f.write_text(json.dumps({"dwi": {"acquisition": "none"}}))
    with pytest.raises(NoMatchError):
        discover(sessions_dataset, ["01"], filters=load_filter_file(f), database_dir=tmp_path / "db2")
    f.write_text(json.dumps({"dwi": {"colour": "x"}}))
    with pytest.raises(UsageError, match="unsupported"):
        load_filter_file(f)


def test_select_subjects(sessions_dataset):
    assert select_subjects(sessions_dataset, None) == ["01", "02"]
    with pytest.raises(UsageError):
        select_subjects(sessions_dataset, ["03"])


def test_session_outputs_through_cli(sessions_dataset, tmp_path):
    out = tmp_path / "out"
    run_cli(sessions_dataset, out, "participant", "--participant-label", "sub-02", "--session-label", "ses-02",
            "--odf-model", "csa", "--tracking", "none", "--skip-bids-validation", check=True)
    f = out / "sub-02" / "ses-02" / "dwi" / "sub-02_ses-02_model-tensor_param-fa_dwimap.nii.gz"
    assert f.exists()
    assert not (out / "sub-02" / "ses-01").exists()


@pytest.fixture
def qsiprep_like(demo_bids, tmp_path):
    """A derivatives dataset with desc-preproc DWI (data scaled, so we can tell it was used) and a mask."""
    deriv = tmp_path / "qsiprep"
    d = deriv / "sub-01" / "dwi"
    d.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "fake qsiprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "qsiprep"}]}))
    raw = demo_bids / "sub-01" / "dwi"
    img = nib.load(raw / "sub-01_dwi.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * 2, img.affine),
             d / "sub-01_desc-preproc_dwi.nii.gz")
    shutil.copy(raw / "sub-01_dwi.bval", d / "sub-01_desc-preproc_dwi.bval")
    shutil.copy(raw / "sub-01_dwi.bvec", d / "sub-01_desc-preproc_dwi.bvec")
    (d / "sub-01_desc-preproc_dwi.json").write_text("{}")
    mask = np.zeros(img.shape[:3], np.uint8)
    mask[5:-5, 5:-5, 3:-3] = 1
    nib.save(nib.Nifti1Image(mask, img.affine), d / "sub-01_desc-brain_mask.nii.gz")
    return deriv


def test_preprocessed_input_preferred_and_mask_used(demo_bids, qsiprep_like, tmp_path):
    inputs = discover(demo_bids, ["01"], derivatives_dir=qsiprep_like, database_dir=tmp_path / "db")
    assert len(inputs) == 1 and inputs[0].source == "derivatives"
    assert inputs[0].dwi.name == "sub-01_desc-preproc_dwi.nii.gz"
    assert inputs[0].mask.name == "sub-01_desc-brain_mask.nii.gz"
    out = tmp_path / "out"
    run_cli(demo_bids, out, "participant", "--participant-label", "01", "--input-derivatives", qsiprep_like,
            "--odf-model", "csa", "--tracking", "none", "--skip-bids-validation", check=True)
    fa_json = json.loads((out / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.json").read_text())
    assert fa_json["Sources"] == ["bids:preprocessed:sub-01/dwi/sub-01_desc-preproc_dwi.nii.gz"]
    mask = np.asarray(nib.load(out / "sub-01" / "dwi" / "sub-01_desc-brain_mask.nii.gz").dataobj)
    assert mask.sum() == np.asarray(nib.load(qsiprep_like / "sub-01" / "dwi" / "sub-01_desc-brain_mask.nii.gz").dataobj).sum()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert "preprocessed" in desc["DatasetLinks"]
