"""Write the demo BIDS raw dataset (with ground truth under ``sourcedata/groundtruth``).

The whole dataset is written into a hidden temporary sibling folder and renamed at the end, so a
crash never leaves half a dataset under the requested name.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..derivatives import save_nifti, write_json
from ..errors import OutputError, UsageError
from ..gradients import voxel_to_fsl_bvecs, write_bvals_bvecs
from . import phantom
from .phantom import BUNDLE_DESCRIPTIONS, BUNDLES
from .simulate import (
    LAMBDA_PERP,
    PATIENT_BUNDLE,
    PATIENT_RD_FACTOR,
    Warp,
    bundle_masks,
    demo_grid,
    make_gradients,
    phantom_maps,
    simulate_subject,
    true_fa,
)

log = logging.getLogger(__name__)

DEMO_GENERATOR = "tractoscale-demo-data"
TEMPLATE_NAME = "phantom"

DWI_SIDECAR = {
    "PhaseEncodingDirection": "j-",
    "TotalReadoutTime": 0.0456,
    "EffectiveEchoSpacing": 0.00057,
    "EchoTime": 0.089,
    "RepetitionTime": 8.4,
    "FlipAngle": 90,
    "MagneticFieldStrength": 3,
    "MRAcquisitionType": "2D",
    "PulseSequenceType": "simulated spin-echo EPI",
    "Manufacturer": "tractoscale phantom simulator",
    "ManufacturersModelName": "multi-tensor phantom",
}
T1W_SIDECAR = {"EchoTime": 0.00298, "RepetitionTime": 2.3, "InversionTime": 0.9,
               "FlipAngle": 9, "MagneticFieldStrength": 3,
               "Manufacturer": "tractoscale phantom simulator"}


def is_demo_dataset(path: Path) -> bool:
    """True if ``path`` holds a dataset written by this generator."""
    desc = Path(path) / "dataset_description.json"
    try:
        d = json.loads(desc.read_text())
    except (OSError, ValueError):
        return False
    return any(isinstance(g, dict) and g.get("Name") == DEMO_GENERATOR
               for g in d.get("GeneratedBy", []))


def check_out_dir(out_dir: Path) -> None:
    """Refuse a destination that exists and is not empty, unless it is a previous demo dataset."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not is_demo_dataset(out_dir):
            raise UsageError(f"{out_dir} exists, is not empty and is not a demo dataset; "
                             "choose a new or empty folder")


def subject_orientation(index: int) -> str:
    """Voxel order of subject ``index`` (1-based): RAS, LAS, LAS, RAS, ... so any two first
    subjects and both groups have an FSL-flipped (det > 0) and an unflipped (det < 0) grid."""
    return "LAS" if index % 4 in (2, 3) else "RAS"


def subject_group(index: int) -> str:
    return "control" if index % 2 == 1 else "patient"


def subject_seed(seed: int, index: int) -> int:
    return int(seed) * 1000 + int(index)


def make_demo_dataset(out_dir, n_subjects: int = 4, size: str = "small", seed: int = 0,
                      sessions: int = 0, shells=(1000,), n_directions: int = 32,
                      snr: float = 30.0, t1w: bool = False) -> Path:
    """Simulate ``n_subjects`` subjects and write a BIDS raw dataset at ``out_dir``.

    Subjects alternate control/patient (patients: radial diffusivity x1.8 in ARC_L).  With
    ``sessions`` > 0 each subject gets that many ``ses-XX`` folders (same anatomy, new head pose
    and noise).  Returns the dataset path.  Deterministic for a given ``seed``.
    """
    out_dir = Path(out_dir).absolute()
    _validate(n_subjects, size, sessions, shells, n_directions, snr)
    check_out_dir(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir.parent}: {exc.strerror}") from None
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(tmp, n_subjects, size, seed, sessions, tuple(shells), n_directions, snr, t1w)
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _validate(n_subjects, size, sessions, shells, n_directions, snr):
    if size not in phantom.SIZES:
        raise UsageError(f"size must be one of {', '.join(phantom.SIZES)}, got {size!r}")
    if int(n_subjects) < 1:
        raise UsageError(f"number of subjects must be >= 1, got {n_subjects}")
    if int(sessions) < 0:
        raise UsageError(f"number of sessions must be >= 0, got {sessions}")
    if len(shells) == 0 or any(float(b) <= 0 for b in shells):
        raise UsageError(f"shells must be positive b-values, got {shells}")
    if int(n_directions) < 6:
        raise UsageError(f"at least 6 directions per shell are needed, got {n_directions}")
    if not float(snr) > 0:
        raise UsageError(f"SNR must be > 0, got {snr}")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError as exc:
        if old is not None:
            os.replace(old, out_dir)
        raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _label(i: int, n: int) -> str:
    return f"{i:0{max(2, len(str(n)))}d}"


def _write_dataset(root: Path, n_subjects, size, seed, sessions, shells, n_directions, snr, t1w):
    root.mkdir(parents=True)
    gt = root / "sourcedata" / "groundtruth"
    bvals, bvecs_voxel = make_gradients(shells, n_directions, seed=seed, b0_every=15 if size == "hcp" else 8)
    effect = _write_template(gt / "template", "full" if size == "hcp" else size)
    _write_top_level(root, n_subjects, seed, size, shells, n_directions, snr, sessions, effect)
    _write_groundtruth_top(gt, effect)

    rows = []
    rng = np.random.default_rng([int(seed), 99])
    ses_list = [None] if sessions == 0 else [_label(k, sessions) for k in range(1, sessions + 1)]
    jobs = [(i, ses) for i in range(1, n_subjects + 1) for ses in ses_list]
    for i in range(1, n_subjects + 1):
        rows.append((f"sub-{_label(i, n_subjects)}", int(rng.integers(22, 75)),
                     "M" if rng.random() < 0.5 else "F", subject_group(i)))
    for i, ses in tqdm(jobs, desc="demo subjects", unit="scan", disable=None):
        sub = _label(i, n_subjects)
        shape, affine = demo_grid(size, subject_orientation(i))
        sim = simulate_subject(shape=shape, affine=affine, bvals=bvals, bvecs_voxel=bvecs_voxel,
                               seed=subject_seed(seed, i), patient=subject_group(i) == "patient",
                               snr=snr, size=size, session=0 if ses is None else int(ses) - 1)
        _write_subject(root, gt, sub, ses, sim, t1w)
    with open(root / "participants.tsv", "w") as f:
        f.write("participant_id\tage\tsex\tgroup\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")


def _write_top_level(root, n_subjects, seed, size, shells, n_directions, snr, sessions, effect):
    write_json(root / "dataset_description.json", {
        "Name": "tractoscale demo: simulated white-matter phantom",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["tractoscale developers", "tractoscale phantom simulator"],
        "GeneratedBy": [{
            "Name": DEMO_GENERATOR, "Version": __version__,
            "Description": (f"size={size} seed={seed} subjects={n_subjects} sessions={sessions} "
                            f"shells={','.join(str(int(b)) for b in shells)} "
                            f"directions={n_directions} snr={snr:g}"),
        }],
    })
    write_json(root / "participants.json", {
        "participant_id": {"Description": "Unique participant identifier"},
        "age": {"Description": "Age of the simulated participant", "Units": "year"},
        "sex": {"Description": "Sex of the simulated participant",
                "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "Group; patients have reduced FA in one bundle "
                                 "(see sourcedata/groundtruth/effects.json)",
                  "Levels": {"control": "control", "patient": "patient"}},
    })
    (root / "README").write_text(
        "tractoscale demo dataset\n========================\n\n"
        "Diffusion MRI simulated from a white-matter phantom (multi-tensor signal, Rician noise).\n"
        f"Bundles: {', '.join(BUNDLES)}. Subjects differ by a small affine and a smooth\n"
        "displacement; patients have the radial diffusivity of "
        f"{PATIENT_BUNDLE} raised ({effect['fa_change_percent']:.1f}% FA change).\n\n"
        "Ground truth (bundle masks, tissue probabilities, true FA, true trajectories as TRX,\n"
        "the subject->template deformation, a template-space atlas) is in\n"
        "sourcedata/groundtruth/. Generated by `tractoscale demo-data`.\n")
    (root / "CHANGES").write_text("1.0.0 2024-01-01\n  - Simulated by tractoscale demo-data.\n")
    (root / ".bidsignore").write_text("sourcedata/\n")


def _write_groundtruth_top(gt: Path, effect: dict):
    gt.mkdir(parents=True, exist_ok=True)
    with open(gt / "bundles.tsv", "w") as f:
        f.write("index\tname\tdescription\n")
        for k, b in enumerate(BUNDLES, start=1):
            f.write(f"{k}\t{b}\t{BUNDLE_DESCRIPTIONS[b]}\n")
    write_json(gt / "effects.json", effect)


def _write_template(tdir: Path, size: str) -> dict:
    """Template-space atlas: trajectories (TRX), masks, tissue, noise-free FA.  Returns the
    effect description (expected FA change in the patient bundle)."""
    geom = phantom.geometry(size)
    shape, affine = geom.grid_shape, geom.affine()
    maps = template_maps(size)
    fa_c = true_fa(maps, patient=False)
    fa_p = true_fa(maps, patient=True)
    tpl = f"tpl-{TEMPLATE_NAME}"
    bmasks = bundle_masks(maps, affine)
    masks = np.stack([bmasks[b] for b in BUNDLES], -1).astype(np.uint8)
    save_nifti(masks, affine, tdir / f"{tpl}_desc-bundles_mask.nii.gz", dtype=np.uint8)
    for t in ("WM", "GM", "CSF"):
        save_nifti(maps.tissue[t], affine, tdir / f"{tpl}_label-{t}_probseg.nii.gz")
    brain = (maps.tissue["WM"] + maps.tissue["GM"] + maps.tissue["CSF"]) >= 0.5
    save_nifti(brain, affine, tdir / f"{tpl}_desc-brain_mask.nii.gz", dtype=np.uint8)
    save_nifti(fa_c, affine, tdir / f"{tpl}_desc-fa_dwimap.nii.gz",
               sidecar={"Description": "noise-free FA of the phantom (controls)"})
    write_trx(maps.streamlines, shape, affine, tdir / f"{tpl}_tractogram.trx")
    write_json(tdir / "template_description.json", {
        "Name": "tractoscale demo phantom template", "Identifier": TEMPLATE_NAME,
        "TemplateFlowVersion": "1.0.0", "License": "CC0",
        "Authors": ["tractoscale developers"], "res": {"01": {"zooms": list(geom.zooms),
                                                               "shape": list(shape)}},
    })
    core = masks[..., BUNDLES.index(PATIENT_BUNDLE)].astype(bool)
    c, p = float(fa_c[core].mean()), float(fa_p[core].mean())
    return {
        "bundle": PATIENT_BUNDLE, "group": "patient", "reference_group": "control",
        "parameter": "radial diffusivity",
        "control_radial_diffusivity": LAMBDA_PERP,
        "patient_radial_diffusivity": LAMBDA_PERP * PATIENT_RD_FACTOR,
        "radial_diffusivity_factor": PATIENT_RD_FACTOR,
        "true_fa_control_mean": round(c, 4), "true_fa_patient_mean": round(p, 4),
        "fa_change_percent": round(100 * (p - c) / c, 2),
        "description": (f"Patients have the radial diffusivity of {PATIENT_BUNDLE} multiplied by "
                        f"{PATIENT_RD_FACTOR}; mean noise-free FA in its mask falls from "
                        f"{c:.3f} to {p:.3f}."),
    }


@lru_cache(maxsize=2)
def template_maps(size: str):
    """Phantom maps on the template grid (identity warp); cached, they depend on size only."""
    geom = phantom.geometry(size)
    return phantom_maps(geom.grid_shape, geom.affine(), Warp(), size)


def write_trx(streamlines: dict, shape, affine, path: Path) -> Path:
    """Write ``{bundle: [(k,3) world-mm arrays]}`` as one TRX with one group per bundle."""
    from dipy.io.stateful_tractogram import Space, StatefulTractogram
    from trx.trx_file_memmap import TrxFile, save

    from ..derivatives import atomic_write

    names = [b for b in BUNDLES if b in streamlines] + [b for b in streamlines if b not in BUNDLES]
    all_sl, groups, start = [], {}, 0
    for b in names:
        sl = [np.asarray(s, dtype=np.float32) for s in streamlines[b]]
        all_sl += sl
        groups[b] = np.arange(start, start + len(sl), dtype=np.uint32)
        start += len(sl)
    ref = nib.Nifti1Image(np.zeros(tuple(shape[:3]), dtype=np.uint8), affine)
    sft = StatefulTractogram(all_sl, ref, Space.RASMM)
    trx = TrxFile.from_sft(sft)
    trx.groups = groups
    with atomic_write(path) as tmp:
        save(trx, str(tmp))
    trx.close()
    return Path(path)


def _write_subject(root: Path, gt: Path, sub: str, ses, sim, t1w: bool):
    ents = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "")
    dwi_dir = root / rel / "dwi"
    save_nifti(np.round(sim.dwi), sim.affine, dwi_dir / f"{ents}_dwi.nii.gz", dtype=np.int16,
               sidecar=DWI_SIDECAR)
    write_bvals_bvecs(dwi_dir / f"{ents}_dwi.bval", dwi_dir / f"{ents}_dwi.bvec", sim.bvals,
                      voxel_to_fsl_bvecs(sim.bvecs_voxel, sim.affine))
    if t1w:
        save_nifti(np.round(sim.t1w), sim.affine, root / rel / "anat" / f"{ents}_T1w.nii.gz",
                   dtype=np.int16, sidecar=T1W_SIDECAR)
    g = gt / rel
    save_nifti(sim.label_image(), sim.affine, g / f"{ents}_desc-bundles_mask.nii.gz",
               dtype=np.uint8, sidecar={"Volumes": list(BUNDLES)})
    for t in ("WM", "GM", "CSF"):
        save_nifti(sim.tissue[t], sim.affine, g / f"{ents}_label-{t}_probseg.nii.gz")
    save_nifti(sim.true_fa, sim.affine, g / f"{ents}_desc-truefa_dwimap.nii.gz")
    save_nifti(sim.deformation_field(), sim.affine, g / f"{ents}_desc-deformation_xfm.nii.gz",
               sidecar={"Description": "template position minus subject position (mm, RAS) at "
                                       "each voxel centre; template = subject + this"})
    write_json(g / f"{ents}_desc-affine_xfm.json", {
        "Description": "affine part of the subject-world -> template map (mm, RAS)",
        "AffineSubjectToTemplate": sim.deformation_affine,
        "Patient": sim.patient,
    })
    write_trx(sim.streamlines, sim.dwi.shape, sim.affine, g / f"{ents}_tractogram.trx")
