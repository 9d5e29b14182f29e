"""Participant level: for each DWI run, model maps then tractography.

Stages (each skipped when its outputs are complete and were made with the
same parameters, unless ``--force``):

1. ``dti``: brain mask, mean b=0, FA/MD/AD/RD, tensor, colour-FA
2. ``odf``: SH coefficients of the chosen ODF model (+ GFA for CSA/OPDT)
3. ``tracking``: whole-brain tractogram (TRX)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..derivatives import bids_name, ensure_dataset_description, save_nifti, sidecar_path, subject_dir
from ..discovery import (DwiInput, check_bids_dir, check_not_inside, discover, load_filter_file,
                         select_subjects)
from ..errors import OutputError, TractoscaleError
from ..inputs import compute_mask, load_dwi, load_mask
from ..models import SH_BASIS_BIDS, TENSOR_ORDER, color_fa, fit_dti, fit_odf
from ..qc import write_participant_qc

log = logging.getLogger("tractoscale.participant")


# --------------------------------------------------------------------------- naming

class Outputs:
    """File names of one DWI run's derivatives."""

    def __init__(self, output_dir: Path, entities: dict, odf_model: str, tracking: str | None,
                 tractogram_ext: str = ".trx"):
        self.dir = subject_dir(output_dir, entities)
        self.ents = dict(entities)
        self.odf_model = odf_model
        self.tracking = tracking
        self.tractogram_ext = tractogram_ext

    def path(self, suffix: str, ext: str = ".nii.gz", **extra) -> Path:
        return self.dir / bids_name({**self.ents, **extra}, suffix, ext)

    def tensor(self, param: str) -> Path:
        return self.path("dwimap", model="tensor", param=param)

    @property
    def mask(self) -> Path:
        return self.path("mask", desc="brain")

    @property
    def meanb0(self) -> Path:
        return self.path("dwiref", desc="meanb0")

    @property
    def sh(self) -> Path:
        return self.path("dwimap", model=self.odf_model, param="sh")

    @property
    def gfa(self) -> Path:
        return self.path("dwimap", model=self.odf_model, param="gfa")

    @property
    def tractogram(self) -> Path:
        return self.path("tractogram", self.tractogram_ext, track=self.tracking)

    def dti_files(self) -> list[Path]:
        return [self.tensor(p) for p in ("fa", "md", "ad", "rd", "tensor", "rgb")] + [self.mask, self.meanb0]

    def odf_files(self) -> list[Path]:
        return [self.sh] + ([self.gfa] if self.odf_model in ("csa", "opdt") else [])


def _normalise(params: dict) -> dict:
    return json.loads(json.dumps(params, default=str))


def stage_complete(files: list[Path], params: dict) -> bool:
    """All files exist and the first one's sidecar records the same parameters."""
    if not all(f.exists() for f in files):
        return False
    try:
        meta = json.loads(sidecar_path(files[0]).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("tractoscale", {}).get("Parameters") == _normalise(params)


# --------------------------------------------------------------------------- sidecars

def _source_uri(inp: DwiInput, bids_dir: Path, deriv_dir: Path | None) -> str:
    root = deriv_dir if inp.source == "derivatives" else bids_dir
    key = "preprocessed" if inp.source == "derivatives" else "raw"
    try:
        rel = inp.dwi.resolve().relative_to(Path(root).resolve())
    except ValueError:
        rel = inp.dwi.name
    return f"bids:{key}:{rel.as_posix() if hasattr(rel, 'as_posix') else rel}"


def _sidecar(source: str, params: dict, **fields) -> dict:
    out = {"Sources": [source]}
    out.update(fields)
    out["tractoscale"] = {"Version": __version__, "Parameters": _normalise(params)}
    return out


DTI_DESCRIPTIONS = {
    "fa": ("Fractional anisotropy", None),
    "md": ("Mean diffusivity", "mm^2/s"),
    "ad": ("Axial diffusivity (largest eigenvalue)", "mm^2/s"),
    "rd": ("Radial diffusivity (mean of the two smallest eigenvalues)", "mm^2/s"),
}


# --------------------------------------------------------------------------- stages

def _save_dti(out: Outputs, dwi, mask, mean_b0, dti, source, params):
    model = {"Description": "Diffusion tensor (dipy TensorModel)",
             "URL": "https://dipy.org", "Parameters": {"FitMethod": "WLS", "BValues": dti.bvalues}}
    aff, hdr = dwi.affine, None
    for p, (desc, units) in DTI_DESCRIPTIONS.items():
        extra = {"Description": desc}
        if units:
            extra["Units"] = units
        save_nifti(getattr(dti, p), aff, out.tensor(p), sidecar=_sidecar(source, params, Model=model, **extra))
    save_nifti(dti.tensor, aff, out.tensor("tensor"), sidecar=_sidecar(
        source, params, Model=model, Units="mm^2/s",
        OrientationEncoding={"Type": "tensor", "Reference": "ijk", "TensorRank": 2,
                             "ComponentOrder": list(TENSOR_ORDER)}))
    save_nifti(color_fa(dti.fa, dti.evecs, aff), aff, out.tensor("rgb"), sidecar=_sidecar(
        source, params, Model=model,
        Description="Colour-coded FA: |principal eigenvector| in world axes (R: left-right, G: anterior-"
                    "posterior, B: inferior-superior) times FA"))
    save_nifti(mask.astype(np.uint8), aff, out.mask, dtype=np.uint8, header=hdr,
               sidecar=_sidecar(source, params, Type="Brain", Description=params["Mask"]))
    save_nifti(mean_b0, aff, out.meanb0, sidecar=_sidecar(source, params, Description="Mean of the b=0 volumes"))


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _save_odf(out: Outputs, dwi, odf, source, params):
    enc = {"Type": "sh", "Reference": "ijk", "SphericalHarmonicBasis": SH_BASIS_BIDS,
           "SphericalHarmonicDegree": odf.sh_order}
    desc = {"csa": "Constant solid angle q-ball ODF (dipy CsaOdfModel)",
            "opdt": "Orientation probability density transform (dipy OpdtModel)",
            "csd": "Constrained spherical deconvolution fibre ODF (dipy, single-shell single-tissue)"}[odf.model]
    model = {"Description": desc, "URL": "https://dipy.org", "Parameters": odf.parameters}
    save_nifti(odf.sh, dwi.affine, out.sh, sidecar=_sidecar(source, params, Model=model, OrientationEncoding=enc))
    if odf.gfa is not None:
        save_nifti(odf.gfa, dwi.affine, out.gfa, sidecar=_sidecar(
            source, params, Model=model, Description="Generalised fractional anisotropy"))


@contextlib.contextmanager
def _run_log(output_dir: Path, label: str):
    """A log file per participant run under output_dir/logs."""
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{label}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
        for h in root.handlers:
            if h is not handler and h.level == logging.NOTSET:
                h.setLevel(old_level or logging.WARNING)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def process_run(inp: DwiInput, args, work: Path) -> str:
    """Process one DWI run; return 'done' or 'skipped'."""
    from .. import tracking as trk

    opts = trk.TrackingOptions.from_args(args)
    out = Outputs(args.output_dir, inp.entities, args.odf_model, opts.method if opts.enabled else None,
                  opts.extension)
    mask_desc = f"provided: {inp.mask.name}" if inp.mask else "computed: dipy median_otsu on the mean b=0"
    dti_params = {"Stage": "dti", "FitMethod": "WLS", "Mask": mask_desc, "Input": str(inp.dwi.name)}
    odf_params = {"Stage": "odf", "Model": args.odf_model, "SHOrder": args.sh_order, "Input": str(inp.dwi.name)}
    trk_params = {"Stage": "tracking", **opts.parameters(), "ODF": args.odf_model, "Input": str(inp.dwi.name)}
    stages = [("dti", out.dti_files(), dti_params), ("odf", out.odf_files(), odf_params)]
    if opts.enabled:
        stages.append(("tracking", [out.tractogram], trk_params))
    todo = {name: args.force or not stage_complete(files, params) for name, files, params in stages}
    if not any(todo.values()):
        log.info("%s: outputs complete, skipping (use --force to recompute)", inp.label)
        return "skipped"

    source = _source_uri(inp, args.bids_dir, args.input_derivatives)
    bar = tqdm(total=len(stages) + 1, desc=inp.label, unit="stage", disable=True if args.no_progress else None,
               leave=False)
    try:
        bar.set_postfix_str("loading")
        dwi = load_dwi(inp.dwi, inp.bval, inp.bvec)
        log.info("%s: %s, %d volumes, voxels %s mm, b-values %s", inp.label, dwi.data.shape[:3],
                 dwi.data.shape[3], "x".join(f"{z:g}" for z in dwi.zooms), sorted({int(b) for b in np.round(dwi.bvals, -1)}))
        bar.update()

        bar.set_postfix_str("dti")
        if todo["dti"]:
            t0 = time.perf_counter()
            mask = load_mask(inp.mask, dwi.data.shape, dwi.affine) if inp.mask else compute_mask(dwi)
            mean_b0 = dwi.data[..., dwi.b0_mask].mean(axis=-1)
            dti = fit_dti(dwi, mask)
            _save_dti(out, dwi, mask, mean_b0, dti, source, dti_params)
            fa = dti.fa
            log.info("%s: DTI done in %.1f s (%d brain voxels, median FA %.2f)", inp.label,
                     time.perf_counter() - t0, int(mask.sum()), float(np.median(fa[mask])))
        else:
            mask = _load(out.mask) > 0
            fa = _load(out.tensor("fa")).astype(np.float32)
        bar.update()

        bar.set_postfix_str(args.odf_model)
        if todo["odf"] or (opts.enabled and todo.get("tracking")):
            if todo["odf"]:
                t0 = time.perf_counter()
                odf = fit_odf(dwi, mask, args.odf_model, args.sh_order, fa=fa, nthreads=args.nthreads)
                _save_odf(out, dwi, odf, source, odf_params)
                sh, sh_order, gfa = odf.sh, odf.sh_order, odf.gfa
                log.info("%s: %s fit done in %.1f s (order %d)", inp.label, args.odf_model.upper(),
                         time.perf_counter() - t0, sh_order)
            else:
                sh = _load(out.sh).astype(np.float32)
                sh_order = json.loads(sidecar_path(out.sh).read_text())["OrientationEncoding"][
                    "SphericalHarmonicDegree"]
                gfa = _load(out.gfa).astype(np.float32) if out.gfa.exists() else None
        bar.update()

        if opts.enabled:
            bar.set_postfix_str(f"tracking ({opts.method})")
            if todo["tracking"]:
                tissue = (_tissue_maps(inp, dwi, out, mask, fa)
                          if opts.stop_method in ("act", "cmc") or opts.seeding == "interface" else None)
                stats = trk.track_subject(
                    opts, dwi=dwi.data, gtab=dwi.gtab(), affine=dwi.affine, mask=mask, fa=fa, sh=sh,
                    sh_order=sh_order, odf_model=args.odf_model, gfa=gfa, tissue=tissue,
                    out_path=out.tractogram, sidecar_extra=_sidecar(source, trk_params), device=args.device)
                log.info("%s: %d streamlines from %d seeds in %.1f s on %s", inp.label,
                         stats.get("n_streamlines", -1), stats.get("n_seeds", -1), stats.get("seconds", -1),
                         stats.get("device", "?"))
            bar.update()
        write_participant_qc(out, inp.label)
    finally:
        bar.close()
    return "done"


def _tissue_maps(inp: DwiInput, dwi, out: Outputs, mask, fa):
    """WM/GM/CSF probability maps on the DWI grid (for ACT/CMC): shipped ones, else from DTI."""
    from ..tissue import dti_tissue_maps, find_tissue_maps
    maps = find_tissue_maps(inp.dwi, dwi.data.shape, dwi.affine)
    if maps is not None:
        return maps
    return dti_tissue_maps(fa, _load(out.tensor("md")), mask)   # fa: the float32 map just written or read


# --------------------------------------------------------------------------- level

@contextlib.contextmanager
def _work_dir(args):
    if args.work_dir is not None:
        path = Path(args.work_dir) / f"tractoscale_{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create work dir {path}: {exc.strerror}") from None
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="tractoscale_") as tmp:
            yield Path(tmp)


def prepare(args) -> list[str]:
    """Checks common to both levels; returns the selected subject labels."""
    check_bids_dir(args.bids_dir)
    check_not_inside(args.bids_dir, args.output_dir)
    subjects = select_subjects(args.bids_dir, args.participant_label)
    if not args.skip_bids_validation:
        from ..validation import validate
        validate(args.bids_dir)
    try:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(args.output_dir) / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to output_dir {args.output_dir}: {exc.strerror}") from None
    return subjects


def run_participant_level(args) -> int:
    from .. import tracking as trk
    trk.TrackingOptions.from_args(args)  # validate tracking options before any work
    subjects = prepare(args)
    filters = load_filter_file(args.bids_filter_file)
    with _work_dir(args) as work:
        db = args.bids_database_dir or (work / "pybids_db")
        inputs = discover(args.bids_dir, subjects, sessions=args.session_label, filters=filters,
                          derivatives_dir=args.input_derivatives, database_dir=db,
                          strict=bool(args.participant_label))
        links = {"preprocessed": args.input_derivatives} if args.input_derivatives else None
        ensure_dataset_description(args.output_dir, args.bids_dir, links)
        results = {}
        failures = []
        for inp in inputs:
            with _run_log(args.output_dir, inp.label) as logfile:
                t0 = time.perf_counter()
                try:
                    status = process_run(inp, args, work)
                    results[inp.label] = status
                    log.info("%s: %s in %.1f s", inp.label, status, time.perf_counter() - t0)
                except TractoscaleError as exc:
                    log.error("%s: %s", inp.label, exc)
                    failures.append((inp.label, exc))
                    results[inp.label] = "failed"
                except Exception:
                    log.exception("%s: unexpected error (log: %s)", inp.label, logfile)
                    raise
    done = sum(v == "done" for v in results.values())
    skipped = sum(v == "skipped" for v in results.values())
    summary = f"participant level: {done} processed, {skipped} already complete, {len(failures)} failed"
    print(summary + f"; outputs in {args.output_dir}")
    if failures:
        for label, exc in failures:
            print(f"tractoscale: error: {label}: {exc}", file=__import__("sys").stderr)
        codes = {exc.exit_code for _, exc in failures}
        return codes.pop() if len(codes) == 1 else 1
    return 0
