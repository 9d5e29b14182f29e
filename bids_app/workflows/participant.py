"""Participant level: for each DWI run, four stages run by the stage runner (:mod:`bids_app.stages`).

1. ``dti``: brain mask, mean b=0, FA/MD/AD/RD, tensor, colour-FA
   ``angsr`` (only with ``--angular-sr MODEL``): the acquired DWI plus volumes predicted at new
   q-space directions (:mod:`bids_app.angular_sr`), ``desc-angsr_dwi.nii.gz`` with .bval/.bvec
2. ``odf-<model>``: SH coefficients of the chosen ODF model (+ GFA for CSA/OPDT), fitted on the
   acquired DWI or, with ``--angular-sr``, on the ``angsr`` DWI
3. ``track-<algorithm>``: whole-brain tractogram (TRX), unless ``--tracking none`` (``learned``: a
   trained network, :mod:`bids_app.learned`)
4. ``qc``: the QC figure, drawn from what the other stages wrote
5. ``report``: the HTML report ``output_dir/<run>.html`` (:mod:`bids_app.reports`), from the files on disk

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
from ..config import Config, Resources
from ..derivatives import (bids_name, ensure_dataset_description, permission_hint, remove_stale_temporaries,
                           run_label, save_nifti,
                           sidecar_path, subject_dir)
from ..discovery import DwiInput, check_bids_dir, check_not_inside, discover, load_filter_file, select_subjects
from ..errors import OutputError, TractoscaleError, describe_os_error
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

    def __init__(self, inp: DwiInput, out: Outputs, source: str, resources: Resources | None = None,
                 angular_sr: bool = False):
        self.inp, self.out, self.source = inp, out, source
        self.resources, self.angular_sr = resources, angular_sr

    def load_dwi(self, mask, files=None):
        """The DWI with the gradient table of its files, holding the voxels of ``mask`` (a boolean
        grid or "auto", see :func:`bids_app.inputs.load_dwi`); ``files``: (dwi, bval, bvec) other
        than the run's inputs."""
        from ..inputs import load_dwi
        from ..resources import remaining_budget
        limit = remaining_budget(self.resources) if self.resources is not None else None
        dwi = load_dwi(*(files or (self.inp.dwi, self.inp.bval, self.inp.bvec)), mask=mask, memory_limit=limit)
        log.info("%s: %s, %d volumes, voxels %s mm, b-values %s; %d brain voxels held (%.0f MB)",
                 self.inp.label, dwi.shape, dwi.n_volumes, "x".join(f"{z:g}" for z in dwi.zooms),
                 sorted({int(b) for b in np.round(dwi.bvals, -1)}), int(dwi.mask.sum()), dwi.nbytes / 2**20)
        return dwi

    @cached_property
    def dwi(self):
        """The DWI in the brain mask, with the gradient table the DTI stage chose (its check)."""
        from ..gradcheck import voxel_transform
        dwi = self.load_dwi(self.mask)
        t = self.gradient_transform
        if t is not None and not np.allclose(t, np.eye(3)):
            m = voxel_transform(t, dwi.affine)
            dwi = dwi.with_bvecs(dwi.bvecs @ m.T)
        return dwi

    @cached_property
    def gradient_transform(self) -> np.ndarray | None:
        """The correction of the b-vectors applied by the DTI stage (file frame), or None."""
        import json
        try:
            meta = json.loads(sidecar_path(self.out.tensor("fa")).read_text())
        except (OSError, ValueError):
            return None
        check = meta.get("GradientCheck") or {}
        t = check.get("AppliedTransform")
        return None if t is None else np.asarray(t, dtype=float)

    def release_dwi(self) -> None:
        """Forget the DWI (the largest array of a run) once no stage of this process needs it."""
        self.__dict__.pop("dwi", None)
        self.__dict__.pop("odf_dwi", None)

    @cached_property
    def odf_dwi(self):
        """What the ODF model is fitted on: the acquired DWI, or with ``--angular-sr`` the acquired plus
        the predicted volumes (their file holds the gradient table the DTI stage chose)."""
        if not self.angular_sr:
            return self.dwi
        return self.load_dwi(self.mask, files=self.out.angsr)

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
        """(SH coefficients in the world frame, SH order, GFA or None)."""
        import json
        sh = _load(self.out.sh).astype(np.float32)
        enc = json.loads(sidecar_path(self.out.sh).read_text())["OrientationEncoding"]
        if enc.get("Reference") != "xyz":
            raise StaleOutput(f"{self.out.sh.name} is not in the world frame (Reference "
                              f"{enc.get('Reference')!r}); rerun with --force")
        gfa = _load(self.out.gfa).astype(np.float32) if self.out.gfa.exists() else None
        return sh, int(enc["SphericalHarmonicDegree"]), gfa


class _Unexpected(TractoscaleError):
    """A participant that failed on a bug (exit 1), reported after the others ran."""


class StaleOutput(TractoscaleError):
    """An output written by an older version that later stages cannot read."""


def _warn_all(label: str, what: str, notes: list[str]) -> None:
    for note in notes:
        log.warning("%s: %s: %s", label, what, note)


# --------------------------------------------------------------------------- stage work

def write_dti(run: RunData, stage: Stage, config: Config) -> None:
    from ..gradcheck import IDENTITY, check_gradients, voxel_transform
    from ..inputs import load_mask
    from ..models import TENSOR_ORDER, color_fa, fit_dti
    from ..resources import memory_budget

    t0 = time.perf_counter()
    inp, out = run.inp, run.out
    if inp.mask:
        img = nib.load(str(inp.dwi))
        mask_arg = load_mask(inp.mask, img.shape, img.affine)
    else:
        mask_arg = "auto"
    dwi = run.load_dwi(mask_arg)
    mask = dwi.mask
    dti = fit_dti(dwi, mask, memory_budget=memory_budget(config.resources), progress=config.execution.progress)
    aff = dwi.affine
    mode = stage.params["GradientCheck"]
    extra: dict = {}
    if mode != "off":
        check = check_gradients(dti.v1, dti.fa, mask, aff, mode=mode)
        (log.warning if check.suspicious else log.info)("%s: %s", inp.label, check.summary())
        if check.applied != IDENTITY:
            m = voxel_transform(check.applied_transform, aff)
            dti = dti.transformed(m, aff)
            dwi = dwi.with_bvecs(dwi.bvecs @ m.T)
        extra["GradientCheck"] = check.sidecar()
    _warn_all(inp.label, "DTI", dti.downgrades)
    if dti.downgrades:
        extra["Downgrades"] = dti.downgrades
    model = {"Description": "Diffusion tensor (dipy TensorModel)",
             "URL": "https://dipy.org", "Parameters": {"FitMethod": "WLS", "BValues": dti.bvalues}}
    for p, (desc, units) in DTI_DESCRIPTIONS.items():
        fields = {"Description": desc, **({"Units": units} if units else {})}
        save_nifti(getattr(dti, p), aff, out.tensor(p),
                   sidecar=_sidecar(run.source, stage, Model=model, **fields, **extra))
    save_nifti(dti.tensor, aff, out.tensor("tensor"), sidecar=_sidecar(
        run.source, stage, Model=model, Units="mm^2/s",
        OrientationEncoding={"Type": "tensor", "Reference": "xyz", "TensorRank": 2,
                             "ComponentOrder": list(TENSOR_ORDER)}, **extra))
    save_nifti(color_fa(dti.fa, dti.v1, aff), aff, out.tensor("rgb"), sidecar=_sidecar(
        run.source, stage, Model=model,
        Description="Colour-coded FA: |principal eigenvector| in world axes (R: left-right, G: anterior-"
                    "posterior, B: inferior-superior) times FA", **extra))
    save_nifti(mask.astype(np.uint8), aff, out.mask, dtype=np.uint8,
               sidecar=_sidecar(run.source, stage, Type="Brain", Description=stage.params["Mask"]))
    save_nifti(dwi.mean_b0, aff, out.meanb0, sidecar=_sidecar(run.source, stage,
                                                               Description="Mean of the b=0 volumes"))
    run.dwi, run.mask, run.fa, run.md = dwi, mask, dti.fa, dti.md
    run.gradient_transform = (check.applied_transform if mode != "off" else None)
    log.info("%s: DTI done in %.1f s (%d brain voxels, median FA %.2f)", inp.label,
             time.perf_counter() - t0, int(mask.sum()), float(np.median(dti.fa[mask])))


def write_odf(run: RunData, stage: Stage, config: Config) -> None:
    from kernels.device import select_device

    from ..config import flag_errors
    from ..gradcheck import IDENTITY, candidates
    from ..models import SH_BASIS_BIDS, fit_odf
    from ..resources import memory_budget

    t0 = time.perf_counter()
    model, out = stage.params["Model"], run.out
    with flag_errors(config.resources.device):
        device = select_device(config.resources.device)
    odf = fit_odf(run.odf_dwi, run.mask, model, stage.params["SHOrder"], fa=run.fa, md=run.md,
                  nthreads=config.resources.nthreads, memory_budget=memory_budget(config.resources),
                  device=device, progress=config.execution.progress)
    _warn_all(run.inp.label, model.upper(), odf.downgrades)
    enc = {"Type": "sh", "Reference": "xyz", "SphericalHarmonicBasis": SH_BASIS_BIDS,
           "SphericalHarmonicDegree": odf.sh_order}
    meta = {"Description": odf.description, "URL": "https://dipy.org", "Parameters": odf.parameters}
    if run.angular_sr:
        meta["Parameters"] = {**odf.parameters, "AngularSuperResolution": sidecar_path(out.angsr[0]).name}
    t = run.gradient_transform
    table = IDENTITY if t is None else next((k for k, m in candidates() if np.allclose(m, t)), "custom")
    extra = {"GradientTable": "as given" if table == IDENTITY else f"corrected by the gradient check: {table}"}
    if odf.downgrades:
        extra["Downgrades"] = odf.downgrades
    save_nifti(odf.sh, run.dwi.affine, out.sh, sidecar=_sidecar(run.source, stage, Model=meta,
                                                                 OrientationEncoding=enc, **extra))
    if odf.gfa is not None:
        save_nifti(odf.gfa, run.dwi.affine, out.gfa, sidecar=_sidecar(
            run.source, stage, Model=meta, Description="Generalised fractional anisotropy", **extra))
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


def write_tractogram(run: RunData, stage: Stage, config: Config, tissue_files: dict | None) -> None:
    from ..resources import remaining_budget
    from ..tracking import RunMaps, track_run

    opts = config.tracking
    sh, sh_order, gfa = run.odf
    dwi = gtab = None
    if opts.algorithm == "boot":   # the residual bootstrap resamples the ODF fit's shell
        from ..models import shell_selection, shells
        sel = shell_selection(run.dwi.bvals, shells(run.dwi.bvals)[:1])
        dwi, gtab = run.dwi.grid(run.dwi.signal[:, sel]), run.dwi.gtab(sel)
    elif opts.learned:             # the network reads the whole signal (resampled to its SH order)
        dwi, gtab = run.dwi.grid(run.dwi.signal), run.dwi.gtab()
    run.release_dwi()              # tracking never needs the whole DWI
    maps = RunMaps(affine=nib.load(str(run.out.mask)).affine, mask=run.mask, fa=run.fa, sh=sh, sh_frame="world",
                   sh_order=sh_order, odf_model=config.models.odf_model, gfa=gfa,
                   tissue=_tissue_maps(run, tissue_files) if _needs_tissue(opts) else None, dwi=dwi, gtab=gtab)
    stats = track_run(opts, maps, run.out.tractogram, device=config.resources.device,
                      gpus=config.resources.gpus, memory_budget=remaining_budget(config.resources),
                      nthreads=config.resources.nthreads,
                      progress=config.execution.progress, sidecar=_sidecar(run.source, stage))
    log.info("%s: %d streamlines from %d seeds in %.1f s on %s", run.inp.label, stats["n_streamlines"],
             stats["n_seeds"], stats["seconds"], stats["device"])


def _needs_tissue(opts) -> bool:
    return opts.stop_method in ("act", "cmc") or opts.seeding == "interface"


def _tissue_maps(run: RunData, files: dict | None):
    """WM/GM/CSF probability maps on the DWI grid (for ACT/CMC): shipped ones, else from DTI."""
    from ..tissue import dti_tissue_maps, load_tissue_maps
    maps = load_tissue_maps(files, run.mask.shape, nib.load(str(run.out.mask)).affine)
    return maps if maps is not None else dti_tissue_maps(run.fa, run.md, run.mask)


def write_qc(run: RunData, stage: Stage) -> None:
    from ..qc import write_participant_qc
    if write_participant_qc(run.out, run.inp.label) is None:
        raise StageSkipped("the QC figure could not be drawn; the next run tries again")


def write_report(run: RunData, stage: Stage, output_dir: Path, stages: list[str]) -> None:
    from ..reports import write_participant_report
    try:
        write_participant_report(run.out, output_dir, bval=run.inp.bval, bvec=run.inp.bvec, stages=stages)
    except Exception as exc:   # a report never fails the science it reports on
        log.debug("%s: report failed", run.inp.label, exc_info=True)
        raise StageSkipped(f"the HTML report could not be written ({type(exc).__name__}: {exc}); "
                           "the next run tries again (details with -vv)") from None


# --------------------------------------------------------------------------- stages of one run

def participant_stages(inp: DwiInput, config: Config, out: Outputs, run: RunData) -> list:
    """``[(Stage, work), ...]`` of one DWI run, upstream first."""
    from ..tissue import tissue_map_files

    label, model, opts = inp.label, config.models.odf_model, config.tracking
    raw = (inp.dwi, inp.bval, inp.bvec)
    mask_desc = f"provided: {inp.mask.name}" if inp.mask else "computed: dipy median_otsu on the mean b=0"
    dti = Stage(f"{label}_dti", outputs=_with_sidecars(out.dti_files()), record_dir=out.records,
                params={"Stage": "dti", "FitMethod": "WLS", "Mask": mask_desc, "Frame": "xyz",
                        "GradientCheck": config.models.gradient_check},
                files=raw + ((inp.mask,) if inp.mask else ()))
    steps = [(dti, partial(write_dti, run, config=config))]
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
                params={**odf_params, "Frame": "xyz", "MultiShell": "msmt" if model == "csd" else "lowest shell"},
                files=raw, upstream=odf_upstream)
    steps.append((odf, partial(write_odf, run, config=config)))
    qc_inputs = [dti]
    if opts.enabled:
        extra = [opts.seed_mask] if opts.seed_mask else []
        tissue_files = tissue_map_files(inp.dwi) if _needs_tissue(opts) else None
        extra += list((tissue_files or {}).values())
        if opts.algorithm == "boot":
            extra += list(raw)
        if opts.learned:
            extra += [opts.tracking_model, *raw]      # the model's content and the signal it reads
        trk = Stage(f"{label}_track-{opts.algorithm}", outputs=_with_sidecars([out.tractogram]),
                    record_dir=out.records, files=tuple(extra), upstream=(dti, odf),
                    params={"Stage": "tracking", **opts.parameters(), "ODF": model})
        steps.append((trk, partial(write_tractogram, run, config=config, tissue_files=tissue_files)))
        qc_inputs.append(trk)
    qc = Stage(f"{label}_qc", outputs=(out.qc_figure,), record_dir=out.records,
               params={"Stage": "qc", "Tractogram": out.tractogram.name if opts.enabled else None},
               upstream=tuple(qc_inputs))
    steps.append((qc, partial(write_qc, run)))
    steps.append(_report_step(inp, config, out, run, [st for st, _ in steps]))
    # the work functions take the stage they run as their last argument
    return [(stage, partial(work, stage=stage)) for stage, work in steps]


def _report_step(inp: DwiInput, config: Config, out: Outputs, run: RunData, upstream: list[Stage]):
    from ..reports import report_paths, viewer
    paths = report_paths(out, config.output_dir)
    stage = Stage(f"{inp.label}_report", outputs=tuple(paths.values()), record_dir=out.records,
                  params={"Stage": "report", "Version": __version__,
                          "Viewer": viewer.bundle_version(viewer.installed_bundle())},
                  files=(inp.bval, inp.bvec), upstream=tuple(upstream))
    names = [st.key.removeprefix(f"{inp.label}_") for st in upstream]
    return stage, partial(write_report, run, output_dir=config.output_dir, stages=names)


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
                  resources=config.resources, angular_sr=config.models.angular_sr is not None)
    steps = participant_stages(inp, config, out, run)
    if config.execution.reports_only:   # the report alone, from what is on disk
        steps = [(st, work) for st, work in steps if st.key.endswith("_report")]
    if opts.learned:     # the data must feed the model before anything of this run is computed
        from ..learned import check_model_file, check_run
        check_run(inp.bval, check_model_file(opts.tracking_model))
    if config.models.angular_sr is not None:     # the shells must be the model's before anything is computed
        from ..angular_sr.app import check_run as check_sr_run
        check_sr_run(inp.bval, _sr_model_info(config.models.angular_sr),
                     config.models.target_bval if config.models.angular_sr_gradients else None)
    force = config.execution.force or config.execution.reports_only
    if not plan(steps, force=force):
        log.info("%s: outputs complete, skipping (use --force to recompute)", inp.label)
        return "skipped"
    with _run_lock(out, inp.label) as waited:
        # planned again under the lock: a run that held it may have completed the stages meanwhile
        todo = plan(steps, force=force and not waited)
        if not todo:
            log.info("%s: completed by another tractoscale process meanwhile, skipping", inp.label)
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


@contextlib.contextmanager
def _run_lock(out: Outputs, label: str):
    """One process at a time per DWI run (the same participant started twice, in two array tasks):
    the second waits for the first; yields whether it had to wait."""
    from filelock import FileLock, Timeout
    out.records.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.records / f"{label}.lock"))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        log.warning("%s: another tractoscale process is working on this run; waiting for it to finish "
                    "(lock %s)", label, lock.lock_file)
        lock.acquire()
    try:
        yield waited
    finally:
        lock.release()


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
    """A fresh private folder (``mkdtemp``: mode 0700, a name nobody else can have taken) in
    ``--work-dir`` or the system's temporary folder; removed at the end, also on SIGTERM."""
    parent = config.resources.work_dir
    try:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"tractoscale_{os.getpid()}_", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot create a work folder in {parent or tempfile.gettempdir()}: "
                          f"{exc.strerror}") from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
        raise OutputError(f"cannot write to output_dir {config.output_dir}: {exc.strerror}"
                          f"{permission_hint(exc)}") from None
    return subjects


def _run_logged(inp: DwiInput, config: Config, work: Path) -> str:
    """:func:`process_run` with its own log file; a file system fault becomes a one-line
    :class:`TractoscaleError` naming the path (exit 73 for outputs), so other runs go on."""
    try:
        with _run_log(config.output_dir, inp.label) as logfile:
            t0 = time.perf_counter()
            try:
                result = process_run(inp, config)
            except OSError as exc:
                log.debug("%s: file system error", inp.label, exc_info=True)
                err = describe_os_error(exc, config.output_dir, work)
                log.error("%s: %s", inp.label, err)
                raise err from None
            except TractoscaleError as exc:
                log.error("%s: %s", inp.label, exc)
                raise
            except Exception:
                log.exception("%s: unexpected error (log: %s)", inp.label, logfile)
                raise
            log.info("%s: %s in %.1f s", inp.label, result, time.perf_counter() - t0)
            return result
    except OSError as exc:       # the log file itself cannot be written
        raise describe_os_error(exc, config.output_dir) from None


def run_participant_level(config: Config) -> int:
    subjects = prepare(config)
    sel = config.selection
    filters = load_filter_file(sel.bids_filter_file)
    out_dir = Path(config.output_dir)
    for path in remove_stale_temporaries([out_dir / f"sub-{s}" for s in subjects]) + \
            remove_stale_temporaries([out_dir], recursive=False):
        log.info("removed %s, left by a process that no longer runs", path)
    with _work_dir(config) as work:
        inputs = discover(config.bids_dir, subjects, sessions=sel.session_label, filters=filters,
                          derivatives_dir=sel.input_derivatives,
                          database_dir=sel.bids_database_dir or (work / "pybids_db"),
                          shared_database=sel.bids_database_dir is not None,
                          strict=bool(sel.participant_label))
        links = {"preprocessed": sel.input_derivatives} if sel.input_derivatives else None
        ensure_dataset_description(config.output_dir, config.bids_dir, links)
        results, failures = {}, []
        for inp in inputs:
            try:
                results[inp.label] = _run_logged(inp, config, work)
            except TractoscaleError as exc:
                failures.append((inp.label, exc))
                results[inp.label] = "failed"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:   # a bug: its traceback is in the run's log, the others still run
                failures.append((inp.label, _Unexpected(f"unexpected error {type(exc).__name__}: {exc} "
                                                        f"(traceback in the run's log under logs/)")))
                results[inp.label] = "failed"
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
