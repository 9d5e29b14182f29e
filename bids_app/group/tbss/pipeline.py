"""The TBSS group step, end to end (collect -> target -> register -> skeleton -> stats).

Outputs, all under ``output_dir/group/tbss/`` (``S`` = the common space label: the
``--tbss-space``/template name, else ``tbss`` for the study-specific target space)::

    space-S_model-tensor_param-fa_desc-mean_dwimap.nii.gz        mean registered FA
    space-S_model-tensor_param-fa_desc-registered_dwimap.nii.gz  4D registered (preprocessed) FA
    space-S_desc-brain_mask.nii.gz                               voxels where every FA > 0
    space-S_desc-skeleton_mask.nii.gz                            thresholded skeleton
    space-S_desc-skeleton_distmap.nii.gz                         distance map used for projection
    space-S_model-tensor_param-<p>_desc-skeleton_dwimap.nii.gz   4D skeletonised FA/MD/AD/RD
    space-S_desc-skeleton_table.tsv                              volumes, participants, QC, means
    space-S_model-tensor_param-<p>_contrast-<c>_stat-<t|tfce|pfwe>_statmap.nii.gz
    space-S_desc-clusters_table.tsv                              significant clusters and peaks
    desc-targetscorescoarse_table.tsv                            auto target selection scores
    xfm/sub-X_from-native_to-S_mode-image_xfm.nii.gz (+ inverse) see bids_app.group.transforms
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ... import __version__
from ...config import Tbss
from ...derivatives import atomic_write, bids_name, save_nifti, shared_lock, sidecar_path, write_json
from ...errors import UsageError
from ...stages import Stage
from ..executor import run_tasks
from ..transforms import grid_points, load_transform, sample_image, transform_paths, xfm_dir, xfm_name
from .collect import ParticipantMaps, collect_maps
from .preprocess import preprocess_fa
from .register import identity_task, registration_task, settings, template_alignment_task
from .skeleton import distance_map, project, skeletonise
from .target import STUDY_SPACE, Target, resolve_target, templateflow_image

log = logging.getLogger(__name__)


def stat_name(entities: dict, contrast: str, stat: str, suffix: str = "statmap", ext: str = ".nii.gz") -> str:
    """bids_name with the ``contrast-``/``stat-`` entities (BIDS stats-model style)."""
    return bids_name({**entities, "contrast": contrast, "stat": stat}, suffix, ext)


def _corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _sidecar(description: str, **extra) -> dict:
    d = {"Description": description, "GeneratedBy": [{"Name": "tractoscale", "Version": __version__}]}
    d.update(extra)
    return d


@dataclass
class CommonSpace:
    """Where every participant is registered to: the target, and optionally a template beyond it."""

    target: Target
    space: str                       # space label of the outputs
    reference: dict                  # registration input {"path", "kind"} whose grid is the common grid
    chain: dict | None = None        # target -> template transforms, when --tbss-space is a template
    chain_stage: Stage | None = None

    @property
    def grid(self) -> tuple[tuple, np.ndarray]:
        img = nib.load(str(self.reference["path"]))
        return img.shape[:3], img.affine.astype(float)


@dataclass
class SkeletonData:
    mask: np.ndarray                 # every registered FA > 0
    mean_fa: np.ndarray
    skeleton: np.ndarray
    distance: np.ndarray
    voxels: np.ndarray               # (n, 3) skeleton voxels
    values: dict                     # scalar -> (participants, n) projected values


def run(*, bids_dir, output_dir, participants: list[dict] | None, options: Tbss, executor,
        sessions=None, progress: bool = True) -> dict:
    """The TBSS step: collect -> design -> target -> register -> warp -> skeleton -> outputs -> stats."""
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    tbss_dir = output_dir / "group" / "tbss"
    disable = None if progress else True
    clock = _Clock()
    found, scalars, problems = collect_maps(output_dir, participants, sessions)
    log.info("TBSS: %d participants (%s)", len(found), ", ".join(s.upper() for s in scalars))
    design = None
    if options.stats_column:  # validate the statistics request before hours of registration
        from .stats import build_design
        design = build_design(bids_dir, [pm.participant_id for pm in found], options.stats_column,
                              list(options.covariates or []))

    common = _common_space(found, options, tbss_dir, executor, disable)
    clock.lap("target selection")
    _register_all(found, common, output_dir, executor, options.tbss_quick, disable)
    clock.lap("registrations")
    warped, qc = _warp_all(found, scalars, common, output_dir)
    skel = _skeleton(warped, scalars, len(found), options.skeleton_threshold)
    clock.lap("warping and skeleton")

    paths, summary, ents, common_desc = _write_outputs(found, scalars, problems, common, skel, warped["fa"], qc,
                                                       tbss_dir, options.skeleton_threshold)
    if design is not None:
        shape, affine = common.grid
        summary["stats"] = _run_stats(design, found, skel.values, scalars, skel.voxels, shape, affine,
                                      tbss_dir, ents, options.n_permutations, options.permutation_seed,
                                      disable, common_desc, paths)
        clock.lap("statistics")
    summary["timings_s"] = clock.laps
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    summary["output_dir"] = str(tbss_dir)
    return summary


def _common_space(found, options: Tbss, tbss_dir: Path, executor, disable) -> CommonSpace:
    target = resolve_target(options.tbss_target, found, executor, out_dir=tbss_dir, quick=options.tbss_quick,
                            disable_progress=disable)
    space_opt = options.tbss_space
    if not space_opt or space_opt == target.space:
        return CommonSpace(target, target.space, target.spec)
    from .target import median_voxel_size
    tpl_path = templateflow_image(space_opt, median_voxel_size(found))
    chain, stage = _align_target(target, tpl_path, space_opt, tbss_dir, executor, options.tbss_quick, disable)
    return CommonSpace(target, space_opt, {"path": str(tpl_path), "kind": "template"}, chain, stage)


def _warp_all(found, scalars, common: CommonSpace, output_dir: Path) -> tuple[dict, list]:
    """Every participant's preprocessed FA and other maps in the common space, and the FA's
    correlation with the reference before and after registration."""
    shape, affine = common.grid
    ref_data = _load_reference(common.reference)
    ref_mask = ref_data > 0
    warped = {s: [] for s in scalars}
    qc = []
    common_pts = grid_points(shape, affine)
    for pm in found:
        xfm = load_transform(output_dir, pm.entities, common.space)
        fa_img = nib.load(str(pm.paths["fa"]))
        fa_pre = preprocess_fa(np.asarray(fa_img.dataobj, np.float32))
        w = xfm.image_to_common(fa_pre, fa_img.affine)
        before = sample_image(fa_pre, fa_img.affine, common_pts)
        qc.append({"corr_before": _corr(before, ref_data, ref_mask), "corr_after": _corr(w, ref_data, ref_mask)})
        warped["fa"].append(w)
        for s in scalars[1:]:
            img = nib.load(str(pm.paths[s]))
            warped[s].append(xfm.image_to_common(np.nan_to_num(np.asarray(img.dataobj, np.float32)), img.affine))
    warped["fa"] = np.stack(warped["fa"], axis=-1)
    return warped, qc


def _skeleton(warped: dict, scalars, n: int, threshold: float) -> SkeletonData:
    """Mean FA, its skeleton and distance map, and every participant's maps projected onto it."""
    all_fa = warped["fa"]
    mask = np.all(all_fa > 0, axis=-1)
    if mask.sum() < 27:
        raise UsageError("the registered FA maps share almost no brain voxels: check the inputs and target")
    mean_fa = np.where(mask, all_fa.mean(axis=-1), 0.0).astype(np.float32)
    skel_raw, dirs = skeletonise(mean_fa, mask)
    skel = skel_raw & (mean_fa >= threshold)
    if not skel.any():
        raise UsageError(f"the skeleton is empty at --skeleton-threshold {threshold}: lower it")
    dist = distance_map(skel, mask)
    vox = np.argwhere(skel)
    values = {s: np.empty((n, len(vox)), np.float32) for s in scalars}
    for i in range(n):
        fa_vals, where = project(all_fa[..., i], vox, dirs, dist)
        values["fa"][i] = fa_vals
        for s in scalars[1:]:
            values[s][i] = warped[s][i].ravel()[where]
    return SkeletonData(mask, mean_fa, skel, dist, vox, values)


def _write_outputs(found, scalars, problems, common: CommonSpace, sk: SkeletonData, all_fa, qc, tbss_dir: Path,
                   threshold: float):
    """The common-space images, the skeleton table and the run summary."""
    target, space = common.target, common.space
    shape, affine = common.grid
    ents = {"space": space}
    common_desc = _space_description(space, target, common.chain)
    src = [str(pm.paths["fa"]) for pm in found]
    volumes = [pm.label for pm in found]
    tbss_dir.mkdir(parents=True, exist_ok=True)

    def save(key, data, entities, suffix, description, dtype=np.float32, **extra):
        paths[key] = save_nifti(data, affine, tbss_dir / bids_name({**ents, **entities}, suffix, ".nii.gz"),
                                dtype=dtype, sidecar=_sidecar(description, **extra, **common_desc))

    paths: dict = {}
    save("mean_fa", sk.mean_fa, {"model": "tensor", "param": "fa", "desc": "mean"}, "dwimap",
         "Mean of the registered, preprocessed FA maps inside the all-subject mask.", Sources=src)
    save("all_fa", all_fa, {"model": "tensor", "param": "fa", "desc": "registered"}, "dwimap",
         "Registered preprocessed FA, one volume per participant (order of the skeleton table).", Volumes=volumes)
    save("mask", sk.mask.astype(np.uint8), {"desc": "brain"}, "mask", "Voxels where every registered FA is > 0.",
         dtype=np.uint8)
    save("skeleton", sk.skeleton.astype(np.uint8), {"desc": "skeleton"}, "mask",
         "Mean-FA skeleton (non-maximum suppression across tracts), thresholded.", dtype=np.uint8,
         Threshold=threshold)
    save("distance", np.where(np.isfinite(sk.distance), sk.distance, 0), {"desc": "skeleton"}, "distmap",
         "Distance (voxels) to the nearest skeleton or non-brain voxel.")
    for s in scalars:
        vol = np.zeros(shape + (len(found),), np.float32)
        vol[tuple(sk.voxels.T)] = sk.values[s].T
        save(f"skeleton_{s}", vol, {"model": "tensor", "param": s, "desc": "skeleton"}, "dwimap",
             f"{s.upper()} projected onto the skeleton" + (" (from the FA projection locations)" if s != "fa" else "")
             + ", one volume per participant.", Volumes=volumes)
    corr_b = [q["corr_before"] for i, q in enumerate(qc) if i != target.index]
    corr_a = [q["corr_after"] for i, q in enumerate(qc) if i != target.index]
    summary = {
        "target": target.describe(), "space": space, "n_participants": len(found),
        "participants": volumes, "left_out": problems, "scalars": scalars,
        "mean_corr_before": float(np.nanmean(corr_b)) if corr_b else float("nan"),
        "mean_corr_after": float(np.nanmean(corr_a)) if corr_a else float("nan"),
        "skeleton_voxels": int(len(sk.voxels)), "skeleton_threshold": threshold,
    }
    paths["table"] = _write_skeleton_table(tbss_dir / bids_name({**ents, "desc": "skeleton"}, "table", ".tsv"),
                                           found, qc, sk.values, scalars, summary)
    return paths, summary, ents, common_desc


# ----------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        import time
        self._time = time.perf_counter
        self._t = self._time()
        self.laps = {}

    def lap(self, name: str):
        now = self._time()
        self.laps[name] = round(now - self._t, 2)
        log.info("TBSS %s: %.1f s", name, now - self._t)
        self._t = now


def _space_description(space: str, target: Target, chain) -> dict:
    d = {"Space": space, "Target": target.describe()}
    if space == STUDY_SPACE:
        d["SpatialReference"] = target.describe()["Image"]
    return d


def _load_reference(spec: dict) -> np.ndarray:
    from .preprocess import load_image
    data, _ = load_image(spec)
    return data


def _align_target(target: Target, tpl_path: Path, space: str, tbss_dir: Path, executor, quick, disable):
    """Register the target to a template (a stage, reused while unchanged); returns (chain, stage)."""
    xdir = xfm_dir(tbss_dir.parent.parent)
    # on the template grid: template point -> target point (resamples target-space images)
    to_target = xdir / xfm_name({}, STUDY_SPACE, space)
    # on the target grid: target point -> template point (moves target-space points)
    to_template = xdir / xfm_name({}, space, STUDY_SPACE)
    st = settings("full", quick)
    stage = Stage(f"target_to-{space}", outputs=_with_sidecars((to_target, to_template)),
                  files=(target.spec["path"], tpl_path), params={"Settings": st.as_dict()})
    if not stage.is_complete():
        meta = {"Target": target.spec["path"], "Template": str(tpl_path), "Settings": st.as_dict()}
        call = ((target.spec, {"path": str(tpl_path), "kind": "template"}, st.as_dict()),
                {"out_to_target": str(to_target), "out_to_template": str(to_template), "meta": meta,
                 "stage": stage})
        for _ in run_tasks(executor, template_alignment_task, [call], desc=f"target -> {space}",
                           disable_progress=disable):
            pass
    return {"to_native": str(to_target), "to_common": str(to_template)}, stage


def _with_sidecars(paths) -> tuple:
    return tuple(paths) + tuple(sidecar_path(p) for p in paths)


def _register_all(found: list[ParticipantMaps], common: CommonSpace, output_dir, executor, quick, disable):
    """Every participant's native <-> common transform: one stage each, run on the executor."""
    st = settings("full", quick)
    target, space = common.target, common.space
    ident, regs = [], []
    for i, pm in enumerate(found):
        is_target = target.kind == "participant" and i == target.index
        stage = Stage(f"{pm.label}_to-{space}", outputs=_with_sidecars(transform_paths(output_dir, pm.entities, space)),
                      files=(pm.paths["fa"], target.spec["path"]),
                      upstream=(common.chain_stage,) if common.chain_stage else (),
                      params={"TargetKind": target.spec["kind"], "Space": space, "Identity": is_target,
                              "Settings": None if is_target else st.as_dict()})
        if stage.is_complete():
            continue
        meta = {"Moving": str(pm.paths["fa"]), "Target": target.spec["path"], "TargetKind": target.spec["kind"],
                "Space": space, "Settings": st.as_dict()}
        kw = {"output_dir": str(output_dir), "entities": pm.entities, "space": space, "chain": common.chain,
              "meta": meta, "stage": stage}
        if is_target:
            ident.append(((target.spec,), kw))
        else:
            regs.append((({"path": str(pm.paths["fa"]), "kind": "fa"}, target.spec, st.as_dict()), kw))
    log.info("registrations: %d to run, %d reused", len(ident) + len(regs), len(found) - len(ident) - len(regs))
    for _ in run_tasks(executor, identity_task, ident, desc="identity", disable_progress=True):
        pass
    for _ in run_tasks(executor, registration_task, regs, desc=f"registration to {target.label}",
                       disable_progress=disable):
        pass


def _write_skeleton_table(path: Path, found, qc, values, scalars, summary) -> Path:
    cols = ["volume", "participant_id", "session_id", "label", "corr_before", "corr_after"] + \
           [f"mean_{s}" for s in scalars]
    lines = ["\t".join(cols)]
    for i, pm in enumerate(found):
        ses = pm.entities.get("ses")
        row = [str(i), pm.participant_id, f"ses-{ses}" if ses else "n/a", pm.label,
               f"{qc[i]['corr_before']:.4f}", f"{qc[i]['corr_after']:.4f}"]
        row += [f"{float(np.mean(values[s][i])):.6g}" for s in scalars]
        lines.append("\t".join(row))
    with shared_lock(path):
        with atomic_write(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        write_json(path.with_suffix(".json"), _sidecar(
            "One row per volume of the 4D skeleton images: participant, FA correlation with the registration "
            "reference before (no registration) and after registration, mean skeleton values.",
            Summary={k: v for k, v in summary.items() if k not in ("participants",)}))
    return path


def _distinct_relabelings(design) -> int:
    """How many different data sets the permutations can make (capped at 10**9)."""
    from math import factorial
    x = design.X[:, 0]
    n = len(x)
    if design.X.shape[1] == 2:  # regressor + intercept: ties in x give identical relabelings
        _, counts = np.unique(x, return_counts=True)
        k = factorial(n)
        for c in counts:
            k //= factorial(int(c))
        return int(min(k, 10 ** 9))
    return int(min(factorial(n), 10 ** 9)) if n < 13 else 10 ** 9


def _run_stats(design, found, values, scalars, vox, shape, affine, tbss_dir, ents, n_perm, seed, progress,
               common_desc, paths) -> dict:
    from kernels.tfce import neighbour_graph

    from .stats import clusters_table, permutation_glm

    skel = np.zeros(shape, bool)
    skel[tuple(vox.T)] = True
    gvox, indptr, indices = neighbour_graph(skel, 26)
    assert np.array_equal(gvox, vox)  # both C order
    rows = design.rows
    distinct = _distinct_relabelings(design)
    if distinct <= 100:
        log.warning("only %d distinct relabelings of the %d participants: FWE p-values cannot go below about "
                    "%.3f", distinct, len(rows), 1 / distinct)
    out = {"kind": design.kind, "column": design.column, "design_columns": design.names,
           "n_used": len(rows), "left_out": design.dropped, "n_permutations": n_perm,
           "distinct_relabelings": distinct, "results": {}}
    table_rows = []
    for s in scalars:
        Y = values[s][rows].astype(np.float64)
        if s != "fa":
            Y = Y * 1e3  # mm^2/s -> um^2/ms: keeps sums of squares well scaled
        res = permutation_glm(Y, design.X, indptr, indices, n_permutations=n_perm, seed=seed, progress=progress)
        for label, sign in design.contrasts:
            t = sign * res.t
            tf = res.tfce[sign]
            p = res.p_fwe[sign]
            meta = _sidecar(f"{s.upper()} skeleton statistics, contrast {label}.", Contrast=label,
                            Design={"Type": design.kind, "Column": design.column, "Columns": design.names,
                                    "Levels": design.levels, "Participants": [found[r].label for r in rows]},
                            Permutations=n_perm, Seed=seed, TFCE={"H": 2.0, "E": 1.0, "Connectivity": 26,
                                                                   "dh": "max/100"},
                            DegreesOfFreedom=res.dof, **common_desc)
            for stat, data in (("t", t), ("tfce", tf), ("pfwe", p)):
                vol = np.zeros(shape, np.float32) if stat != "pfwe" else np.ones(shape, np.float32)
                vol[tuple(vox.T)] = data
                key = f"{s}_{label}_{stat}"
                paths[key] = save_nifti(vol, affine, tbss_dir / stat_name(
                    {**ents, "model": "tensor", "param": s}, label, stat),
                    sidecar={**meta, "Statistic": {"t": "t statistic", "tfce": "TFCE of the t map",
                                                   "pfwe": "FWE-corrected p (TFCE max statistic); 1 off "
                                                           "the skeleton"}[stat]})
            cl = clusters_table(p, t, tf, vox, affine, indptr, indices)
            for r in cl:
                table_rows.append({"param": s, "contrast": label, **r})
            out["results"][f"{s}:{label}"] = {"min_p_fwe": float(p.min()), "n_significant": int((p < 0.05).sum()),
                                              "n_clusters": len(cl), "max_t": float(t.max())}
    cpath = tbss_dir / bids_name({**ents, "desc": "clusters"}, "table", ".tsv")
    cols = ["param", "contrast", "cluster", "n_voxels", "min_p_fwe", "peak_tfce", "peak_t", "peak_i", "peak_j",
            "peak_k", "peak_x", "peak_y", "peak_z"]
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in table_rows]
    with shared_lock(cpath):
        with atomic_write(cpath) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        write_json(cpath.with_suffix(".json"), _sidecar(
            "Clusters (26-connected on the skeleton) of voxels with FWE-corrected p < 0.05, with their TFCE "
            "peaks; coordinates are voxel indices and world mm of the common space.", **common_desc))
    paths["clusters"] = cpath
    return out
