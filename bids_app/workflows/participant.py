"""Participant level: for each DWI run, four stages run by the stage runner (:mod:`bids_app.stages`).

1. ``dti``: brain mask, mean b=0, FA/MD/AD/RD, tensor, colour-FA
   ``angsr`` (only with ``--angular-sr MODEL``): the acquired DWI plus volumes predicted at new
   q-space directions (:mod:`bids_app.angular_sr`), ``desc-angsr_dwi.nii.gz`` with .bval/.bvec
2. ``odf-<model>``: SH coefficients of the chosen ODF model (+ GFA for CSA/OPDT), fitted on the
   acquired DWI or, with ``--angular-sr``, on the ``angsr`` DWI
3. ``track-<algorithm>``: whole-brain tractogram (TRX), unless ``--tracking none`` (``learned``: a
   trained network, :mod:`bids_app.learned`)
4. ``qc``: the QC figure, drawn from what the other stages wrote

A stage runs when its completion record is missing or stale (other parameters, other inputs, or an
upstream stage that ran again); everything downstream of it runs too.  The DWI is loaded only when
a stage needs it, so a missing QC figure is redrawn without fitting anything.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from functools import cached_property, partial
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..config import Config
from ..derivatives import bids_name, ensure_dataset_description, run_label, save_nifti, sidecar_path, subject_dir
from ..discovery import DwiInput, check_bids_dir, check_not_inside, discover, load_filter_file, select_subjects
from ..errors import OutputError, TractoscaleError
from ..stages import RECORD_DIR, Stage, StageSkipped, plan

log = logging.getLogger("tractoscale.participant")

DTI_DESCRIPTIONS = {
    "fa": ("Fractional anisotropy", None),
    "md": ("Mean diffusivity", "mm^2/s"),
    "ad": ("Axial diffusivity (largest eigenvalue)", "mm^2/s"),
    "rd": ("Radial diffusivity (mean of the two smallest eigenvalues)", "mm^2/s"),
}


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
    def label(self) -> str:
        return run_label(self.ents)

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

    @property
    def qc_figure(self) -> Path:
        return self.dir.parent / "figures" / f"{self.label}_desc-qc_dwimap.png"

    @property
    def records(self) -> Path:
        return self.dir / RECORD_DIR

    def dti_files(self) -> list[Path]:
        return [self.tensor(p) for p in ("fa", "md", "ad", "rd", "tensor", "rgb")] + [self.mask, self.meanb0]

    @property
    def angsr(self) -> tuple[Path, Path, Path]:
        """The super-resolved DWI (``--angular-sr``) and its .bval/.bvec."""
        return (self.path("dwi", desc="angsr"), self.path("dwi", ".bval", desc="angsr"),
                self.path("dwi", ".bvec", desc="angsr"))

    def odf_files(self) -> list[Path]:
        return [self.sh] + ([self.gfa] if self.odf_model in ("csa", "opdt") else [])


def _with_sidecars(files: list[Path]) -> tuple[Path, ...]:
    return tuple(files) + tuple(sidecar_path(f) for f in files)


def _source_uri(inp: DwiInput, bids_dir: Path, deriv_dir: Path | None) -> str:
    root = deriv_dir if inp.source == "derivatives" else bids_dir
    key = "preprocessed" if inp.source == "derivatives" else "raw"
    try:
        rel = inp.dwi.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        rel = inp.dwi.name
    return f"bids:{key}:{rel}"


def _sidecar(source: str, stage: Stage, **fields) -> dict:
    out = {"Sources": [source]}
    out.update(fields)
    out["tractoscale"] = {"Version": __version__, "Parameters": dict(stage.params)}
    return out


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# --------------------------------------------------------------------------- one run's data

class RunData:
    """One DWI run's inputs and maps, each loaded on first use (from memory when a stage of this
    process just computed it, else from its output file)."""

    def __init__(self, inp: DwiInput, out: Outputs, source: str, angular_sr: bool = False):
        self.inp, self.out, self.source, self.angular_sr = inp, out, source, angular_sr

    @cached_property
    def dwi(self):
        from ..inputs import load_dwi
        dwi = load_dwi(self.inp.dwi, self.inp.bval, self.inp.bvec)
        log.info("%s: %s, %d volumes, voxels %s mm, b-values %s", self.inp.label, dwi.data.shape[:3],
                 dwi.data.shape[3], "x".join(f"{z:g}" for z in dwi.zooms),
                 sorted({int(b) for b in np.round(dwi.bvals, -1)}))
        return dwi

    @cached_property
    def odf_dwi(self):
        """What the ODF model is fitted on: the acquired DWI, or with ``--angular-sr`` the acquired plus
        the predicted volumes."""
        if not self.angular_sr:
            return self.dwi
        from ..inputs import load_dwi
        return load_dwi(*self.out.angsr)

    @cached_property
    def mask(self) -> np.ndarray:
        return _load(self.out.mask) > 0

    @cached_property
    def fa(self) -> np.ndarray:
        return _load(self.out.tensor("fa")).astype(np.float32)

    @cached_property
    def md(self) -> np.ndarray:
        return _load(self.out.tensor("md")).astype(np.float32)

    @cached_property
    def odf(self):
        """(SH coefficients, SH order, GFA or None)."""
        import json
        sh = _load(self.out.sh).astype(np.float32)
        order = json.loads(sidecar_path(self.out.sh).read_text())["OrientationEncoding"]["SphericalHarmonicDegree"]
        gfa = _load(self.out.gfa).astype(np.float32) if self.out.gfa.exists() else None
        return sh, int(order), gfa


# --------------------------------------------------------------------------- stage work

def write_dti(run: RunData, stage: Stage) -> None:
    from ..inputs import compute_mask, load_mask
    from ..models import TENSOR_ORDER, color_fa, fit_dti

    t0 = time.perf_counter()
    dwi, inp, out = run.dwi, run.inp, run.out
    mask = load_mask(inp.mask, dwi.data.shape, dwi.affine) if inp.mask else compute_mask(dwi)
    mean_b0 = dwi.data[..., dwi.b0_mask].mean(axis=-1)
    dti = fit_dti(dwi, mask)
    model = {"Description": "Diffusion tensor (dipy TensorModel)",
             "URL": "https://dipy.org", "Parameters": {"FitMethod": "WLS", "BValues": dti.bvalues}}
    aff = dwi.affine
    for p, (desc, units) in DTI_DESCRIPTIONS.items():
        extra = {"Description": desc, **({"Units": units} if units else {})}
        save_nifti(getattr(dti, p), aff, out.tensor(p), sidecar=_sidecar(run.source, stage, Model=model, **extra))
    save_nifti(dti.tensor, aff, out.tensor("tensor"), sidecar=_sidecar(
        run.source, stage, Model=model, Units="mm^2/s",
        OrientationEncoding={"Type": "tensor", "Reference": "ijk", "TensorRank": 2,
                             "ComponentOrder": list(TENSOR_ORDER)}))
    save_nifti(color_fa(dti.fa, dti.evecs, aff), aff, out.tensor("rgb"), sidecar=_sidecar(
        run.source, stage, Model=model,
        Description="Colour-coded FA: |principal eigenvector| in world axes (R: left-right, G: anterior-"
                    "posterior, B: inferior-superior) times FA"))
    save_nifti(mask.astype(np.uint8), aff, out.mask, dtype=np.uint8,
               sidecar=_sidecar(run.source, stage, Type="Brain", Description=stage.params["Mask"]))
    save_nifti(mean_b0, aff, out.meanb0, sidecar=_sidecar(run.source, stage,
                                                           Description="Mean of the b=0 volumes"))
    run.mask, run.fa, run.md = mask, dti.fa, dti.md
    log.info("%s: DTI done in %.1f s (%d brain voxels, median FA %.2f)", inp.label,
             time.perf_counter() - t0, int(mask.sum()), float(np.median(dti.fa[mask])))


def write_odf(run: RunData, stage: Stage, nthreads: int | None) -> None:
    from ..models import SH_BASIS_BIDS, fit_odf

    t0 = time.perf_counter()
    model, out = stage.params["Model"], run.out
    odf = fit_odf(run.odf_dwi, run.mask, model, stage.params["SHOrder"], fa=run.fa, nthreads=nthreads)
    enc = {"Type": "sh", "Reference": "ijk", "SphericalHarmonicBasis": SH_BASIS_BIDS,
           "SphericalHarmonicDegree": odf.sh_order}
    desc = {"csa": "Constant solid angle q-ball ODF (dipy CsaOdfModel)",
            "opdt": "Orientation probability density transform (dipy OpdtModel)",
            "csd": "Constrained spherical deconvolution fibre ODF (dipy, single-shell single-tissue)"}[model]
    meta = {"Description": desc, "URL": "https://dipy.org", "Parameters": odf.parameters}
    if run.angular_sr:
        meta["Parameters"] = {**odf.parameters, "AngularSuperResolution": sidecar_path(out.angsr[0]).name}
    save_nifti(odf.sh, run.odf_dwi.affine, out.sh, sidecar=_sidecar(run.source, stage, Model=meta,
                                                                 OrientationEncoding=enc))
    if odf.gfa is not None:
        save_nifti(odf.gfa, run.odf_dwi.affine, out.gfa, sidecar=_sidecar(
            run.source, stage, Model=meta, Description="Generalised fractional anisotropy"))
    run.odf = (odf.sh, odf.sh_order, odf.gfa)
    log.info("%s: %s fit done in %.1f s (order %d)", run.inp.label, model.upper(), time.perf_counter() - t0,
             odf.sh_order)


def write_angsr(run: RunData, stage: Stage, config: Config) -> None:
    from ..angular_sr.app import write_angsr as predict_and_write
    predict_and_write(run.dwi, run.mask, run.inp, run.out.angsr, model_path=config.models.angular_sr,
                      n_new=config.models.sr_directions, device=config.resources.device,
                      targets=(None if config.models.angular_sr_gradients is None else
                               (config.models.target_bval, config.models.angular_sr_gradients)),
                      nthreads=config.resources.nthreads, progress=config.execution.progress,
                      sidecar=_sidecar(run.source, stage))


def write_tractogram(run: RunData, stage: Stage, config: Config) -> None:
    from ..resources import memory_budget
    from ..tracking import RunMaps, track_run

    opts = config.tracking
    sh, sh_order, gfa = run.odf
    needs_dwi = opts.algorithm == "boot" or opts.learned
    maps = RunMaps(affine=nib.load(str(run.out.mask)).affine, mask=run.mask, fa=run.fa, sh=sh,
                   sh_order=sh_order, odf_model=config.models.odf_model, gfa=gfa,
                   tissue=_tissue_maps(run, stage) if _needs_tissue(opts) else None,
                   dwi=run.dwi.data if needs_dwi else None, gtab=run.dwi.gtab() if needs_dwi else None)
    stats = track_run(opts, maps, run.out.tractogram, device=config.resources.device,
                      memory_budget=memory_budget(config.resources), nthreads=config.resources.nthreads,
                      progress=config.execution.progress, sidecar=_sidecar(run.source, stage))
    log.info("%s: %d streamlines from %d seeds in %.1f s on %s", run.inp.label, stats["n_streamlines"],
             stats["n_seeds"], stats["seconds"], stats["device"])


def _needs_tissue(opts) -> bool:
    return opts.stop_method in ("act", "cmc") or opts.seeding == "interface"


def _tissue_maps(run: RunData, stage: Stage):
    """WM/GM/CSF probability maps on the DWI grid (for ACT/CMC): shipped ones, else from DTI."""
    from ..tissue import dti_tissue_maps, load_tissue_maps
    files = {Path(p).name.split("_label-")[1].split("_")[0]: Path(p) for p in stage.files
             if "_label-" in Path(p).name}
    maps = load_tissue_maps(files, run.mask.shape, nib.load(str(run.out.mask)).affine)
    return maps if maps is not None else dti_tissue_maps(run.fa, run.md, run.mask)


def write_qc(run: RunData, stage: Stage) -> None:
    from ..qc import write_participant_qc
    if write_participant_qc(run.out, run.inp.label) is None:
        raise StageSkipped("the QC figure could not be drawn; the next run tries again")


# --------------------------------------------------------------------------- stages of one run

def participant_stages(inp: DwiInput, config: Config, out: Outputs, run: RunData) -> list:
    """``[(Stage, work), ...]`` of one DWI run, upstream first."""
    from ..tissue import tissue_map_files

    label, model, opts = inp.label, config.models.odf_model, config.tracking
    raw = (inp.dwi, inp.bval, inp.bvec)
    mask_desc = f"provided: {inp.mask.name}" if inp.mask else "computed: dipy median_otsu on the mean b=0"
    dti = Stage(f"{label}_dti", outputs=_with_sidecars(out.dti_files()), record_dir=out.records,
                params={"Stage": "dti", "FitMethod": "WLS", "Mask": mask_desc},
                files=raw + ((inp.mask,) if inp.mask else ()))
    steps = [(dti, partial(write_dti, run))]
    odf_upstream, odf_params = (dti,), {"Stage": "odf", "Model": model, "SHOrder": config.models.sh_order}
    if config.models.angular_sr is not None:
        sr_model = config.models.angular_sr
        grads = config.models.angular_sr_gradients
        targets = {"DirectionsPerShell": config.models.sr_directions} if grads is None else \
            {"Gradients": Path(grads).name}
        angsr = Stage(f"{label}_angsr", outputs=(*out.angsr, sidecar_path(out.angsr[0])), record_dir=out.records,
                      params={"Stage": "angular-sr", "Model": Path(sr_model).name, **targets},
                      files=raw + (sr_model,) + ((config.models.target_bval, grads) if grads else ()),
                      upstream=(dti,))     # the model's and the gradient files' contents are inputs
        steps.append((angsr, partial(write_angsr, run, config=config)))
        odf_upstream += (angsr,)
        odf_params["AngularSR"] = Path(sr_model).name
    odf = Stage(f"{label}_odf-{model}", outputs=_with_sidecars(out.odf_files()), record_dir=out.records,
                params=odf_params, files=raw, upstream=odf_upstream)
    steps.append((odf, partial(write_odf, run, nthreads=config.resources.nthreads)))
    qc_inputs = [dti]
    if opts.enabled:
        extra = [opts.seed_mask] if opts.seed_mask else []
        if _needs_tissue(opts):
            extra += list((tissue_map_files(inp.dwi) or {}).values())
        if opts.algorithm == "boot":
            extra += list(raw)
        if opts.learned:
            extra += [opts.tracking_model, *raw]      # the model's content and the signal it reads
        trk = Stage(f"{label}_track-{opts.algorithm}", outputs=_with_sidecars([out.tractogram]),
                    record_dir=out.records, files=tuple(extra), upstream=(dti, odf),
                    params={"Stage": "tracking", **opts.parameters(), "ODF": model})
        steps.append((trk, partial(write_tractogram, run, config=config)))
        qc_inputs.append(trk)
    qc = Stage(f"{label}_qc", outputs=(out.qc_figure,), record_dir=out.records,
               params={"Stage": "qc", "Tractogram": out.tractogram.name if opts.enabled else None},
               upstream=tuple(qc_inputs))
    steps.append((qc, partial(write_qc, run)))
    # the work functions take the stage they run as their last argument
    return [(stage, partial(work, stage=stage)) for stage, work in steps]


@functools.lru_cache(maxsize=2)
def _sr_model_info(path: Path):
    from ..angular_sr.app import check_model_file
    return check_model_file(path)


def process_run(inp: DwiInput, config: Config) -> str:
    """Run the stages of one DWI run that are not complete; return 'done' or 'skipped'."""
    opts = config.tracking
    out = Outputs(config.output_dir, inp.entities, config.models.odf_model,
                  opts.algorithm if opts.enabled else None, opts.extension)
    run = RunData(inp, out, _source_uri(inp, config.bids_dir, config.selection.input_derivatives),
                  angular_sr=config.models.angular_sr is not None)
    if opts.learned:     # the data must feed the model before anything of this run is computed
        from ..learned import check_model_file, check_run
        check_run(inp.bval, check_model_file(opts.tracking_model))
    if config.models.angular_sr is not None:     # the shells must be the model's before anything is computed
        from ..angular_sr.app import check_run as check_sr_run
        check_sr_run(inp.bval, _sr_model_info(config.models.angular_sr),
                     config.models.target_bval if config.models.angular_sr_gradients else None)
    todo = plan(participant_stages(inp, config, out, run), force=config.execution.force)
    if not todo:
        log.info("%s: outputs complete, skipping (use --force to recompute)", inp.label)
        return "skipped"
    bar = tqdm(total=len(todo), desc=inp.label, unit="stage", leave=False,
               disable=None if config.execution.progress else True)
    try:
        for stage, work in todo:
            bar.set_postfix_str(stage.key.removeprefix(inp.label + "_"))
            with stage.running():
                work()
            bar.update()
    finally:
        bar.close()
    return "done"


# --------------------------------------------------------------------------- level

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


@contextlib.contextmanager
def _work_dir(config: Config):
    if config.resources.work_dir is not None:
        path = Path(config.resources.work_dir) / f"tractoscale_{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create work dir {path}: {exc.strerror}") from None
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="tractoscale_") as tmp:
            yield Path(tmp)


def prepare(config: Config) -> list[str]:
    """Checks common to both levels; returns the selected subject labels."""
    check_bids_dir(config.bids_dir)
    check_not_inside(config.bids_dir, config.output_dir)
    subjects = select_subjects(config.bids_dir, config.selection.participant_label)
    if not config.selection.skip_bids_validation:
        from ..validation import validate
        validate(config.bids_dir)
    try:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(config.output_dir) / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to output_dir {config.output_dir}: {exc.strerror}") from None
    return subjects


def run_participant_level(config: Config) -> int:
    subjects = prepare(config)
    sel = config.selection
    filters = load_filter_file(sel.bids_filter_file)
    with _work_dir(config) as work:
        inputs = discover(config.bids_dir, subjects, sessions=sel.session_label, filters=filters,
                          derivatives_dir=sel.input_derivatives,
                          database_dir=sel.bids_database_dir or (work / "pybids_db"),
                          strict=bool(sel.participant_label))
        links = {"preprocessed": sel.input_derivatives} if sel.input_derivatives else None
        ensure_dataset_description(config.output_dir, config.bids_dir, links)
        results, failures = {}, []
        for inp in inputs:
            with _run_log(config.output_dir, inp.label) as logfile:
                t0 = time.perf_counter()
                try:
                    results[inp.label] = process_run(inp, config)
                    log.info("%s: %s in %.1f s", inp.label, results[inp.label], time.perf_counter() - t0)
                except TractoscaleError as exc:
                    log.error("%s: %s", inp.label, exc)
                    failures.append((inp.label, exc))
                    results[inp.label] = "failed"
                except Exception:
                    log.exception("%s: unexpected error (log: %s)", inp.label, logfile)
                    raise
    done = sum(v == "done" for v in results.values())
    skipped = sum(v == "skipped" for v in results.values())
    print(f"participant level: {done} processed, {skipped} already complete, {len(failures)} failed; "
          f"outputs in {config.output_dir}")
    if failures:
        import sys
        for label, exc in failures:
            print(f"tractoscale: error: {label}: {exc}", file=sys.stderr)
        codes = {exc.exit_code for _, exc in failures}
        return codes.pop() if len(codes) == 1 else 1
    return 0
