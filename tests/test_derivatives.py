"""Derivatives hygiene: names, atomic writes, concurrent dataset_description.json updates."""
import json
import multiprocessing as mp

import nibabel as nib
import numpy as np
import pytest

from bids_app.derivatives import (atomic_write, bids_name, ensure_dataset_description, save_nifti,
                                  sidecar_path)


def test_bids_name_order():
    ents = {"desc": "x", "param": "fa", "sub": "01", "model": "tensor", "ses": "A", "run": "2"}
    assert bids_name(ents, "dwimap", ".nii.gz") == "sub-01_ses-A_run-2_model-tensor_param-fa_desc-x_dwimap.nii.gz"
    assert bids_name({"sub": "01", "track": "prob"}, "tractogram", "trx") == "sub-01_track-prob_tractogram.trx"
    with pytest.raises(ValueError):
        bids_name({"sub": "01", "bogus": "1"}, "dwimap", ".nii.gz")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "sub-01_dwimap.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_save_nifti_with_sidecar_roundtrip(tmp_path):
    path = tmp_path / "sub-01_model-tensor_param-fa_dwimap.nii.gz"
    data = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    save_nifti(data, aff, path, sidecar={"Description": "FA"})
    img = nib.load(path)
    assert np.allclose(img.get_fdata(), data) and np.allclose(img.affine, aff)
    assert json.loads(sidecar_path(path).read_text()) == {"Description": "FA"}


def _hammer(out, i):
    for _ in range(20):
        ensure_dataset_description(out, f"/data/raw{i % 2}")


def test_dataset_description_concurrent_writers(tmp_path):
    out = tmp_path / "deriv"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(out, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert sorted(s["URL"] for s in desc["SourceDatasets"]) == ["file:///data/raw0", "file:///data/raw1"]
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["tractoscale"]


def test_container_info_in_generated_by(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACTOSCALE_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("TRACTOSCALE_CONTAINER_TAG", "tractoscale/tractoscale:0.1.0")
    ensure_dataset_description(tmp_path, None)
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "tractoscale/tractoscale:0.1.0"}


def test_apptainer_wins_over_image_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACTOSCALE_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("TRACTOSCALE_CONTAINER_TAG", "tractoscale/tractoscale:0.1.0")
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/tractoscale.sif")
    from bids_app.derivatives import container_info
    assert container_info() == {"Type": "singularity", "Tag": "tractoscale/tractoscale:0.1.0"}
