"""Edge cases seen on real data: an empty tractogram, a participant failing on a bug, a group level
without a bundle atlas."""
import json
import shutil

import pytest

from conftest import run_cli


def test_empty_tractogram_does_not_break_qc(demo_bids, tmp_path):
    """No streamline passes the length criteria: the run succeeds, the QC figure is drawn and says so."""
    out = tmp_path / "derivatives"
    proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", "--skip-bids-validation",
                   "--odf-model", "csa", "--tracking", "det", "--min-length", "240", "--max-length", "250",
                   "--nthreads", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    d = out / "sub-01" / "dwi"
    side = json.loads((d / "sub-01_track-det_tractogram.json").read_text())
    assert side["NumberOfStreamlines"] == 0
    assert (out / "sub-01" / "figures" / "sub-01_desc-qc_dwimap.png").exists()
    from bids_app.qc import qc_notes
    from bids_app.workflows.participant import Outputs
    notes = qc_notes(Outputs(out, {"sub": "01"}, "csa", "det"))
    assert any("tractogram is empty" in n for n in notes), notes
    assert any(n.startswith("gradient check (auto): table as given") for n in notes), notes


def test_a_participant_failing_on_a_bug_does_not_stop_the_others(demo_bids, tmp_path, monkeypatch):
    from bids_app.config import Config
    from bids_app.workflows import participant

    real = participant.process_run

    def buggy(inp, config):
        if inp.label == "sub-01":
            raise ZeroDivisionError("a bug")
        return real(inp, config)

    monkeypatch.setattr(participant, "process_run", buggy)
    out = tmp_path / "derivatives"
    config = Config.from_argv([str(demo_bids), str(out), "participant", "--skip-bids-validation",
                               "--tracking", "none", "--odf-model", "csa", "--no-progress", "--nthreads", "2"])
    code = participant.run_participant_level(config)
    assert code == 1
    assert (out / "sub-02" / "dwi" / "sub-02_model-csa_param-sh_dwimap.nii.gz").exists()
    assert not (out / "sub-01" / "dwi").exists()
    log = next((out / "logs").glob("sub-01_*.log")).read_text()
    assert "ZeroDivisionError: a bug" in log and "Traceback" in log


@pytest.mark.slow
def test_group_level_without_atlas_keeps_tbss_and_skips_segmentation(participant_run, demo_copy, tmp_path):
    """Not the demo dataset (no atlas of its own) and no --atlas: TBSS runs and stands, the
    segmentation is skipped with a warning, exit 0."""
    out = tmp_path / "derivatives"
    shutil.copytree(participant_run[0], out, ignore=shutil.ignore_patterns("group", "logs"))
    proc = run_cli(demo_copy, out, "group", "--skip-bids-validation", "--tbss-quick", "--no-progress",
                   "--nthreads", "2")
    assert proc.returncode == 0, proc.stderr
    assert "bundle segmentation skipped: no atlas" in proc.stderr
    assert (out / "group" / "tbss" / "space-tbss_desc-skeleton_mask.nii.gz").exists()
    assert not (out / "group" / "bundles").exists()
