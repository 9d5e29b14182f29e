"""The HTML reports: written from what the stages wrote, regenerated without redoing science, every
warning and downgrade shown; the viewer's display copies and its installer.  (The browser checks are
in test_reports_browser.py.)"""
import io
import json
import re
import shutil
import tarfile

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli


def _records(out, sub="01"):
    d = out / f"sub-{sub}" / "dwi" / ".stages"
    return {p.stem.removeprefix(f"sub-{sub}_"): json.loads(p.read_text())["run"] for p in d.glob("*.json")}


def _sections(html: str) -> list[str]:
    return re.findall(r'<section id="[^"]+" data-section="([^"]+)"', html)


@pytest.fixture
def run_copy(participant_run, tmp_path):
    out = tmp_path / "deriv"
    shutil.copytree(participant_run[0], out)     # tests never change shared fixtures
    return out


def test_participant_report_says_what_the_stages_wrote(participant_run, demo_bids):
    out = participant_run[0]
    html = (out / "sub-01.html").read_text()
    assert _sections(html) == ["summary", "inputs", "mask", "dti", "odf", "gradient-check", "tractography", "qc",
                               "warnings", "parameters"]
    side = json.loads((out / "sub-01/dwi/sub-01_track-prob_tractogram.json").read_text())
    assert f"<td class=\"num\">{side['NumberOfStreamlines']:,}</td>" in html
    assert f"<td class=\"num\">{side['NumberOfSeeds']:,}</td>" in html
    bvals = np.loadtxt(demo_bids / "sub-01/dwi/sub-01_dwi.bval")
    n_dwi = int((bvals > 50).sum())
    assert re.search(rf"<td>1000</td><td class=\"num\">{n_dwi}</td>", html)           # the shell's row
    sh = json.loads((out / "sub-01/dwi/sub-01_model-csa_param-sh_dwimap.json").read_text())
    assert f"Spherical harmonics of order {sh['OrientationEncoding']['SphericalHarmonicDegree']}" in html
    for src in re.findall(r'<img class="figure" src="([^"]+)"', html):
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert re.search(r"<td>report</td>", html) is None        # the report does not list itself as a stage


def test_missing_report_is_rewritten_without_redoing_science_and_shows_warnings(run_copy, demo_bids):
    out = run_copy
    [log] = [p for p in (out / "logs").glob("sub-01_*.log")]
    with open(log, "a") as f:   # a warning of the run that wrote these outputs (same log, same process)
        f.write("2026-01-01 00:00:00,000 WARNING tractoscale.participant: sub-01: SH order lowered to 4\n"
                "  (only 15 directions)\n")
    (out / "sub-01.html").unlink()
    before = _records(out)
    proc = run_cli(demo_bids, out, "participant", "--participant-label", "01", "--odf-model", "csa",
                   "--skip-bids-validation", "-v", check=True)
    after = _records(out)
    assert {k for k in before if after[k] != before[k]} == {"report"}
    assert "volumes, voxels" not in proc.stderr              # the DWI was not even loaded
    html = (out / "sub-01.html").read_text()
    assert "SH order lowered to 4\n  (only 15 directions)" in html
    # the run's own downgrade (CSA order 8 -> 6 on 32 directions: logged and in two sidecars) is
    # listed once, beside the warning added above
    assert "2 warning(s)" in html
    assert html.count("SH order lowered from 8 to 6") == 1


def test_reports_only_shows_sidecar_downgrades_and_gradient_check(run_copy, demo_bids):
    out = run_copy
    sh = out / "sub-01/dwi/sub-01_model-csa_param-sh_dwimap.json"
    side = json.loads(sh.read_text())
    side["Downgrades"] = list(side.get("Downgrades", [])) + ["the b=3000 shell left out (written by this test)"]
    sh.write_text(json.dumps(side))
    for p in ("fa", "md"):    # the DTI stage repeats its check in every map's sidecar: shown once
        path = out / f"sub-01/dwi/sub-01_model-tensor_param-{p}_dwimap.json"
        side = json.loads(path.read_text())
        side["GradientCheck"] = {"Chosen": "identity", "Scores": {"identity": 41.5, "flip-x": 12.25}}
        path.write_text(json.dumps(side))
    before = _records(out)
    run_cli(demo_bids, out, "participant", "--participant-label", "01", "--odf-model", "csa",
            "--skip-bids-validation", "--reports-only", check=True)
    after = _records(out)
    assert {k for k in before if after[k] != before[k]} == {"report"}   # the sidecars' size changed: no matter
    html = (out / "sub-01.html").read_text()
    assert html.count("the b=3000 shell left out (written by this test)") == 1
    assert html.count("Scores.flip-x</td><td>12.25") == 1 and "Chosen</td><td>identity" in html
    assert html.count("SH order lowered from 8 to 6") == 1     # the run's own: in its log and two sidecars
    assert (out / "sub-02.html").exists()


def test_group_reports_only_needs_no_group_run(run_copy, demo_bids):
    """With participant outputs only, --reports-only writes a group report that says what is missing
    (and runs nothing: no registration, no log)."""
    out = run_copy
    proc = run_cli(demo_bids, out, "group", "--skip-bids-validation", "--reports-only", check=True)
    html = (out / "group" / "report.html").read_text()
    assert "group report:" in proc.stdout
    assert _sections(html)[0] == "participants" and "No TBSS registration outputs." in html
    assert "sub-01" in html and "sub-02" in html
    assert not (out / "group" / "tbss").exists() and not list((out / "logs").glob("group_*.log"))


# ----------------------------------------------------------------------------- pieces

def test_run_logs_are_those_of_the_runs_that_wrote_the_outputs(tmp_path):
    from bids_app.reports import records
    logs = tmp_path / "logs"
    logs.mkdir()
    for name, line in (("sub-01_20260101-100000_11.log", "old warning"),
                       ("sub-01_20260102-100000_22.log", "current warning"),
                       ("sub-01_20260103-100000_22.log", "later run, same pid"),
                       ("sub-010_20260102-100000_22.log", "another subject")):
        (logs / name).write_text(f"2026-01-02 10:00:01,000 INFO x: start\n"
                                 f"2026-01-02 10:00:02,000 WARNING x.y: {line}\nsecond line\n"
                                 f"2026-01-02 10:00:03,000 INFO x: done\n")
    recs = [{"pid": 22, "finished": "2026-01-02T11:00:00"}]
    chosen = records.run_logs(logs, "sub-01", recs)
    assert [p.name for p in chosen] == ["sub-01_20260102-100000_22.log"]
    [w] = records.log_warnings(chosen)
    assert w["message"] == "current warning\nsecond line" and w["level"] == "WARNING" and w["logger"] == "x.y"
    assert [p.name for p in records.run_logs(logs, "sub-01")] == ["sub-01_20260103-100000_22.log"]


def test_odf_glyphs_point_along_the_fibre_in_world_axes():
    """An oblique fibre along world (1, 1, 0) in an LAS image, its SH stored in the voxel frame (as the
    ODF stage writes them): the glyph's longest radius points along world (1, 1, 0), not along the
    voxel-frame direction (-1, 1, 0) that ignoring the frame would draw; with the world frame too."""
    from dipy.core.sphere import Sphere
    from dipy.data import get_sphere
    from dipy.reconst.shm import sf_to_sh

    from bids_app.reports.figures import glyph_radii
    from bids_app.reports.participant import _to_sh_frame
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])                          # LAS
    fibre_world = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    for reference, fibre_frame in (("ijk", fibre_world * [-1, 1, 1]), ("xyz", fibre_world)):
        v = get_sphere(name="repulsion724").vertices
        sf = np.exp(-8 * (1 - (v @ fibre_frame) ** 2))               # a lobe along +-fibre in the SH frame
        sh = sf_to_sh(sf, Sphere(xyz=v), sh_order_max=8, basis_type="tournier07", legacy=False)
        dirs, _, radii = glyph_radii(sh[None], 8, _to_sh_frame({"OrientationEncoding": {"Reference": reference}},
                                                                affine))
        longest = dirs[np.argmax(radii[0])]
        assert abs(longest @ fibre_world) > 0.95, (reference, longest)


def test_display_copies_round_trip(tmp_path):
    from trx.trx_file_memmap import load

    from bids_app.reports import viewer
    ref = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    t = np.linspace(0, 1, 21)[:, None]
    sl = [np.hstack([t * 20, t * 0 + k, t * 0]).astype(np.float32) for k in range(5)]   # 1 mm steps
    data = viewer.trx_bytes(sl, ref, spacing=2.0, groups={"A": [0, 1], "B": [2, 3, 4]})
    (tmp_path / "v.trx").write_bytes(data)
    trx = load(str(tmp_path / "v.trx"))
    try:
        assert len(trx.streamlines) == 5
        np.testing.assert_allclose(trx.streamlines[3], sl[3][::2], atol=0.01)   # every 2nd point, both ends
        assert {k: list(np.asarray(v).ravel()) for k, v in trx.groups.items()} == {"A": [0, 1], "B": [2, 3, 4]}
    finally:
        trx.close()
    fa = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    (tmp_path / "fa.nii.gz").write_bytes(viewer.volume_bytes(fa, np.eye(4)))
    back = nib.load(str(tmp_path / "fa.nii.gz"))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.get_fdata(), fa, atol=0.5 / 255 + 1e-6)
    assert list(viewer.subset(10, 20)) == list(range(10))
    pick = viewer.subset(1000, 50, seed=1)
    assert len(set(pick)) == 50 and list(pick) == sorted(pick)


def test_install_viewer_rejects_a_tarball_that_is_not_the_pinned_release(tmp_path):
    tgz = tmp_path / "niivue-niivue-0.69.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in (("package/dist/niivue.umd.js", b"alert(1)"),
                           ("package/package.json", b'{"name": "@niivue/niivue", "version": "0.69.0"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "viewer"
    proc = run_cli("install-viewer", "--tarball", tgz, "--dest", dest)
    assert proc.returncode == 66
    assert proc.stderr.startswith("tractoscale: error: niivue-niivue-0.69.0.tgz is not @niivue/niivue 0.69.0")
    assert "Traceback" not in proc.stderr and not dest.exists()
