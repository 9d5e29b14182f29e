"""The stage runner: completion records, invalidation downstream, kills between outputs, QC redrawn."""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_app.stages import Stage, StageSkipped, plan
from conftest import run_cli


# ----------------------------------------------------------------------------- the runner itself

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _pipeline(tmp_path, a_param=1, b_param=1):
    raw = tmp_path / "raw.txt"
    a = Stage("a", outputs=(tmp_path / "out" / "a1.txt", tmp_path / "out" / "a2.txt"), params={"p": a_param},
              files=(raw,))
    b = Stage("b", outputs=(tmp_path / "out" / "b.txt",), params={"q": b_param}, upstream=(a,))
    return raw, a, b


def _run_all(steps):
    ran = []
    for stage, _ in plan(steps):
        with stage.running():
            for o in stage.outputs:
                _write(o, f"{stage.key} {dict(stage.params)}")
        ran.append(stage.key)
    return ran


def test_complete_stages_are_skipped_and_changes_rerun_downstream(tmp_path):
    raw, a, b = _pipeline(tmp_path)
    raw.write_text("data")
    assert _run_all([(a, None), (b, None)]) == ["a", "b"]
    assert a.is_complete() and b.is_complete()
    assert _run_all([(a, None), (b, None)]) == []
    # a parameter of the upstream stage: both run again
    raw, a2, b2 = _pipeline(tmp_path, a_param=2)
    assert _run_all([(a2, None), (b2, None)]) == ["a", "b"]
    # a parameter of the downstream stage only
    raw, a3, b3 = _pipeline(tmp_path, a_param=2, b_param=5)
    assert _run_all([(a3, None), (b3, None)]) == ["b"]
    # the input file's content
    raw.write_text("other data")
    assert [s.key for s, _ in plan([(a3, None), (b3, None)])] == ["a", "b"]
    assert not a3.is_complete()


def test_upstream_rerun_invalidates_downstream_records(tmp_path):
    raw, a, b = _pipeline(tmp_path)
    raw.write_text("data")
    _run_all([(a, None), (b, None)])
    with a.running():       # a runs again with the same parameters (e.g. --force on that stage)
        for o in a.outputs:
            _write(o, "new")
    assert a.is_complete() and not b.is_complete()


def test_missing_or_changed_output_and_failures(tmp_path):
    raw, a, b = _pipeline(tmp_path)
    raw.write_text("data")
    _run_all([(a, None), (b, None)])
    a.outputs[1].unlink()
    assert not a.is_complete()
    _run_all([(a, None), (b, None)])
    a.outputs[0].write_text("a different size")
    assert not a.is_complete()
    _run_all([(a, None), (b, None)])
    # a failure inside the stage: the record was removed first and is not written
    with pytest.raises(RuntimeError, match="boom"):
        with a.running():
            raise RuntimeError("boom")
    assert not a.record_path.exists() and not a.is_complete()
    # an output that was never written is an error, not a record
    c = Stage("c", outputs=(tmp_path / "out" / "never.txt",))
    with pytest.raises(RuntimeError, match="did not write"):
        with c.running():
            pass
    assert not c.record_path.exists()
    # StageSkipped leaves no record and no error (the next run tries again)
    with c.running():
        raise StageSkipped("not now")
    assert not c.record_path.exists()


def test_records_survive_moving_the_folder(tmp_path):
    raw, a, b = _pipeline(tmp_path / "one")
    raw.parent.mkdir(parents=True)
    raw.write_text("data")
    _run_all([(a, None), (b, None)])
    shutil.move(tmp_path / "one", tmp_path / "two")
    raw, a, b = _pipeline(tmp_path / "two")
    assert a.is_complete() and b.is_complete()


# ----------------------------------------------------------------------------- participant stages

def _records(out, sub="01"):
    d = out / f"sub-{sub}" / "dwi" / ".stages"
    return {p.stem.removeprefix(f"sub-{sub}_"): json.loads(p.read_text()) for p in d.glob("*.json")}


@pytest.fixture
def csa_run(participant_run, tmp_path):
    """A private copy of the shared participant run (tests never change shared fixtures)."""
    out = tmp_path / "deriv"
    shutil.copytree(participant_run[0], out)
    return out


def _fa(out, sub="01"):
    return out / f"sub-{sub}" / "dwi" / f"sub-{sub}_model-tensor_param-fa_dwimap.nii.gz"


def test_every_participant_stage_has_a_record(csa_run):
    rec = _records(csa_run)
    assert set(rec) == {"dti", "odf-csa", "track-prob", "qc", "report"}
    assert rec["track-prob"]["params"]["step_size"] is None   # the option as given; the kernel's value is in
    side = json.loads(csa_run.joinpath("sub-01/dwi/sub-01_track-prob_tractogram.json").read_text())
    assert side["StepSize"] == 1.25                            # the sidecar: half the 2.5 mm voxel


def test_sh_order_change_reruns_odf_and_downstream_only(csa_run, demo_bids):
    before = {k: v["run"] for k, v in _records(csa_run).items()}
    fa_time = _fa(csa_run).stat().st_mtime_ns
    proc = run_cli(demo_bids, csa_run, "participant", "--participant-label", "01", "--odf-model", "csa",
                   "--sh-order", "4", "--skip-bids-validation", check=True)
    assert "1 processed" in proc.stdout
    after = {k: v["run"] for k, v in _records(csa_run).items()}
    assert after["dti"] == before["dti"] and _fa(csa_run).stat().st_mtime_ns == fa_time
    for stage in ("odf-csa", "track-prob", "qc", "report"):
        assert after[stage] != before[stage], stage
    sh = nib.load(str(csa_run / "sub-01/dwi/sub-01_model-csa_param-sh_dwimap.nii.gz"))
    assert sh.shape[-1] == 15      # order 4
    trk = json.loads(csa_run.joinpath("sub-01/dwi/sub-01_track-prob_tractogram.json").read_text())
    assert trk["StreamlinePropagation"]["SphericalHarmonicOrder"] == 4


@pytest.fixture
def preprocessed(demo_bids, tmp_path):
    """A preprocessed-derivatives dataset (the demo's DWI as desc-preproc) and a participant run on
    it without a brain mask; returns (derivatives folder, output folder, the new mask to add)."""
    deriv = tmp_path / "preproc"
    d = deriv / "sub-01" / "dwi"
    d.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "preprocessed", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "qsiprep"}]}))
    raw = demo_bids / "sub-01" / "dwi"
    for ext in ("nii.gz", "bval", "bvec", "json"):
        shutil.copy(raw / f"sub-01_dwi.{ext}", d / f"sub-01_desc-preproc_dwi.{ext}")
    out = tmp_path / "out"
    run_cli(demo_bids, out, "participant", "--participant-label", "01", "--input-derivatives", deriv,
            "--odf-model", "csa", "--tracking", "none", "--skip-bids-validation", check=True)
    computed = nib.load(str(out / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz"))
    mask = np.asarray(computed.dataobj) > 0
    mask[:, :, : mask.shape[2] // 2] = False
    return deriv, out, mask, computed.affine


def _add_mask(deriv, mask, affine):
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), deriv / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz")


def _consistent(out, mask):
    """FA, MD and the saved mask all follow ``mask``."""
    fa = np.asarray(nib.load(str(_fa(out))).dataobj)
    md = np.asarray(nib.load(str(out / "sub-01/dwi/sub-01_model-tensor_param-md_dwimap.nii.gz")).dataobj)
    saved = np.asarray(nib.load(str(out / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz")).dataobj) > 0
    return np.array_equal(saved, mask) and not fa[~mask].any() and not md[~mask].any() and md[mask].any()


def test_adding_a_brain_mask_reruns_everything(preprocessed, demo_bids):
    deriv, out, mask, affine = preprocessed
    before = {k: v["run"] for k, v in _records(out).items()}
    assert set(before) == {"dti", "odf-csa", "qc", "report"}
    _add_mask(deriv, mask, affine)
    run_cli(demo_bids, out, "participant", "--participant-label", "01", "--input-derivatives", deriv,
            "--odf-model", "csa", "--tracking", "none", "--skip-bids-validation", check=True)
    after = _records(out)
    assert all(after[k]["run"] != before[k] for k in before)
    assert after["dti"]["params"]["Mask"] == "provided: sub-01_desc-brain_mask.nii.gz"
    assert _consistent(out, mask)


def test_missing_qc_figure_is_redrawn_without_refitting(csa_run, demo_bids):
    fig = csa_run / "sub-01" / "figures" / "sub-01_desc-qc_dwimap.png"
    fig.unlink()
    before = {k: v["run"] for k, v in _records(csa_run).items()}
    proc = run_cli(demo_bids, csa_run, "participant", "--participant-label", "01", "--odf-model", "csa",
                   "--skip-bids-validation", "-v", check=True)
    assert "1 processed" in proc.stdout
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = {k: v["run"] for k, v in _records(csa_run).items()}
    assert {k for k in before if after[k] != before[k]} == {"qc", "report"}
    assert "volumes, voxels" not in proc.stderr        # the DWI was not even loaded


class _Killed(BaseException):
    """What SIGTERM/SIGKILL would do to the process: not an Exception, nothing catches it."""


@pytest.mark.parametrize("kill_after", [1, 4, 9, 15])
def test_kill_between_outputs_never_leaves_a_complete_mixed_stage(preprocessed, demo_bids, monkeypatch,
                                                                  kill_after):
    """The DTI stage rewrites its 16 files (8 maps + sidecars) after a brain mask was added; the run
    dies after ``kill_after`` of them.  The stage must not count as complete, and the next run must
    redo it (and everything downstream) so the FA, MD and mask agree again."""
    from bids_app.config import Config
    from bids_app.discovery import discover
    from bids_app.workflows import participant as wf

    deriv, out, mask, affine = preprocessed
    _add_mask(deriv, mask, affine)
    config = Config.from_argv([str(demo_bids), str(out), "participant", "--participant-label", "01",
                               "--input-derivatives", str(deriv), "--odf-model", "csa", "--tracking", "none",
                               "--no-progress"])
    [inp] = discover(demo_bids, ["01"], derivatives_dir=deriv, database_dir=None)
    assert inp.mask is not None
    real_replace = os.replace
    count = {"n": 0}

    def dying_replace(src, dst):
        real_replace(src, dst)
        if ".stages" not in str(dst):
            count["n"] += 1
            if count["n"] == kill_after:
                raise _Killed()

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(_Killed):
        wf.process_run(inp, config)
    monkeypatch.setattr(os, "replace", real_replace)
    if kill_after < 13:                        # the mask is the 13th file: before it, old and new disagree
        assert not _consistent(out, mask)      # a mix of old and new files is on disk...
    outputs = wf.Outputs(out, inp.entities, "csa", None)
    run = wf.RunData(inp, outputs, "x")
    todo = [s.key.removeprefix("sub-01_") for s, _ in wf.plan(wf.participant_stages(inp, config, outputs, run))]
    assert todo == ["dti", "odf-csa", "qc", "report"]    # ...and nothing of it counts as complete
    assert wf.process_run(inp, config) == "done"
    assert _consistent(out, mask)
    assert wf.process_run(inp, config) == "skipped"
