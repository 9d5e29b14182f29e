"""Input checks: every broken-input case gets a clear one-line error (exit 65)."""
import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import InputDataError
from bids_app.inputs import load_dwi
from conftest import run_cli


def _paths(root, sub="01"):
    d = root / f"sub-{sub}" / "dwi"
    return d / f"sub-{sub}_dwi.nii.gz", d / f"sub-{sub}_dwi.bval", d / f"sub-{sub}_dwi.bvec"


def _drop_last_bval(bval, bvec, img):
    vals = bval.read_text().split()
    bval.write_text(" ".join(vals[:-1]) + "\n")


def _no_b0(bval, bvec, img):
    vals = np.loadtxt(bval)
    vals[vals < 50] = 1000
    np.savetxt(bval, vals[None], fmt="%d")


def _non_unit(bval, bvec, img):
    vecs = np.loadtxt(bvec)
    vals = np.loadtxt(bval)
    i = int(np.flatnonzero(vals > 50)[0])
    vecs[:, i] *= 1.5
    np.savetxt(bvec, vecs, fmt="%.6f")


def _nans(bval, bvec, img):
    im = nib.load(img)
    data = np.asarray(im.dataobj, dtype=np.float32)
    data[5, 5, 5, 1] = np.nan
    nib.save(nib.Nifti1Image(data, im.affine), img)  # float32 header keeps the NaN


def _three_d(bval, bvec, img):
    im = nib.load(img)
    nib.save(nib.Nifti1Image(np.asarray(im.dataobj)[..., 0], im.affine), img)


def _bad_affine(bval, bvec, img):
    im = nib.load(img)
    aff = im.affine.copy()
    aff[0, 0] = np.nan
    hdr = im.header.copy()
    new = nib.Nifti1Image(np.asarray(im.dataobj), None, hdr)
    new.header.set_sform(aff, code=1)
    new.header.set_qform(None, code=0)
    nib.save(new, img)


def _bvec_count(bval, bvec, img):
    vecs = np.loadtxt(bvec)
    np.savetxt(bvec, vecs[:, :-2], fmt="%.6f")


CASES = [
    (_drop_last_bval, "b-values but the image has"),
    (_bvec_count, "vectors but the image has"),
    (_no_b0, "no b=0 volume"),
    (_non_unit, "unit vectors"),
    (_nans, "NaN"),
    (_three_d, "must be 4D"),
    (_bad_affine, "affine"),
]


@pytest.mark.parametrize("breaker, words", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_broken_inputs_are_clear_errors(demo_copy, breaker, words):
    img, bval, bvec = _paths(demo_copy)
    breaker(bval, bvec, img)
    with pytest.raises(InputDataError, match=words.replace("(", r"\(")):
        load_dwi(img, bval, bvec)


def test_broken_input_through_cli_exit_65_other_subject_still_processed(demo_copy, tmp_path):
    img, bval, bvec = _paths(demo_copy, "01")
    _no_b0(bval, bvec, img)
    out = tmp_path / "out"
    proc = run_cli(demo_copy, out, "participant", "--skip-bids-validation", "--odf-model", "csa",
                   "--tracking", "none")
    assert proc.returncode == 65, proc.stderr
    assert "sub-01" in proc.stderr and "no b=0 volume" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the healthy subject was processed; nothing half-written for the broken one
    assert (out / "sub-02" / "dwi" / "sub-02_model-tensor_param-fa_dwimap.nii.gz").exists()
    left = [p for p in (out / "sub-01").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert not left, left      # only the run's lock file (hidden, in .stages)
    assert not list(out.rglob(".*partial*"))
