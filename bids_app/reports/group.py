"""The group report: ``output_dir/group/report.html`` with its figures in ``group/figures/``.

Drawn from the files of the group level (``group/tbss``, ``group/bundles``, the participants'
bundle tractograms) and its log; nothing is registered, tested or segmented again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..stages import RECORD_DIR, Stage
from . import figures, records, viewer
from .render import relative as _rel
from .render import render_to

log = logging.getLogger(__name__)

REPORT = ("group", "report.html")
FIG_DIR = ("group", "figures")
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # matplotlib's tab10


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(Path(folder).glob(pattern))
    return found[0] if found else None


class GroupFiles:
    """The group level's outputs that the report reads, and the files it writes."""

    def __init__(self, output_dir: Path):
        self.output_dir = out = Path(output_dir)
        self.html = out.joinpath(*REPORT)
        self.fig_dir = out.joinpath(*FIG_DIR)
        self.tbss = out / "group" / "tbss"
        self.bundles = out / "group" / "bundles"
        self.skeleton_table = _one(self.tbss, "space-*_desc-skeleton_table.tsv")
        self.space = records.read_json(self.skeleton_table.with_suffix(".json")).get("Summary", {}).get("space") \
            if self.skeleton_table else None
        sp = f"space-{self.space}" if self.space else "space-*"
        self.target_scores = _one(self.tbss, "desc-targetscores*_table.tsv")
        self.registered = _one(self.tbss, f"{sp}_model-tensor_param-fa_desc-registered_dwimap.nii.gz")
        self.mean_fa = _one(self.tbss, f"{sp}_model-tensor_param-fa_desc-mean_dwimap.nii.gz")
        self.skeleton = _one(self.tbss, f"{sp}_desc-skeleton_mask.nii.gz")
        self.clusters = _one(self.tbss, f"{sp}_desc-clusters_table.tsv")
        self.pmaps = sorted(self.tbss.glob(f"{sp}_model-tensor_param-*_contrast-*_stat-pfwe_statmap.nii.gz"))
        self.counts = self.bundles / "bundle_counts.tsv"
        self.profiles = self.bundles / "tract_profiles.tsv"
        self.bundle_figs = sorted(self.bundles.glob("figures/*_bundles.png"))
        self.profile_figs = sorted(self.bundles.glob("figures/tract-*_profiles.png"))
        self.bundle_trx = sorted(p for p in out.glob("sub-*/**/dwi/*_desc-bundles_tractogram.trx"))
        self.logs = sorted(out.glob("logs/group_*.log"))

    def figure(self, name: str) -> Path:
        return self.fig_dir / f"desc-{name}_report.png"

    def viewer_script(self, trx: Path) -> Path:
        return self.fig_dir / f"{trx.name.split('_track-')[0]}_desc-bundles_report.js"

    def outputs(self) -> list[Path]:
        """Every file the report writes, known before it is written (the report stage's outputs)."""
        outs = [self.html]
        if self.registered is not None and self.skeleton_table is not None:
            outs.append(self.figure("registration"))
        if self.mean_fa is not None and self.skeleton is not None:
            outs.append(self.figure("skeleton"))
            outs += [self.figure(_stat_name(p)) for p in self.pmaps]
        if self.bundle_trx and viewer.installed_bundle() is not None:
            outs += [self.viewer_script(p) for p in self.bundle_trx]
            outs.append(self.output_dir.joinpath(*viewer.OUTPUT_SUBDIR, viewer.BUNDLE))
        return outs

    def inputs(self) -> list[Path]:
        files = [self.skeleton_table, self.target_scores, self.registered, self.mean_fa, self.skeleton,
                 self.clusters, *self.pmaps, self.counts, self.profiles, *self.bundle_figs, *self.profile_figs,
                 *self.bundle_trx]
        return [p for p in files if p is not None and p.exists()]


def _stat_name(pmap: Path) -> str:
    from ..derivatives import parse_entities
    e = parse_entities(pmap.name)
    return f"stat{e.get('param', '')}{e.get('contrast', '')}"


def report_stage(output_dir: Path) -> Stage:
    """The group report as a stage: rewritten when an input changed or an output is missing."""
    files = GroupFiles(output_dir)
    return Stage("group_report", outputs=tuple(files.outputs()), files=tuple(files.inputs()),
                 record_dir=Path(output_dir) / "group" / RECORD_DIR,
                 params={"Stage": "report", "Version": __version__,
                         "Viewer": viewer.bundle_version(viewer.installed_bundle())})


# --------------------------------------------------------------------------- sections

def _participants(files: GroupFiles, summary: dict, bids_dir: Path | None) -> dict:
    """Who went into each group step, and who was left out and why."""
    table = records.read_table(files.skeleton_table) if files.skeleton_table else None
    tbss = list(table["label"]) if table is not None else []
    seg = sorted({p.name.split("_track-")[0] for p in files.bundle_trx})
    stats_used = None
    for p in files.pmaps[:1]:
        stats_used = records.read_json(Path(str(p).replace(".nii.gz", ".json"))).get("Design", {}).get("Participants")
    with_outputs = sorted({p.name.split("_model-")[0] for p in files.output_dir.glob(
        "sub-*/**/dwi/*_model-tensor_param-fa_dwimap.nii.gz") if "space-" not in p.name})
    listed = []
    tsv = Path(bids_dir) / "participants.tsv" if bids_dir else None
    if tsv is not None and tsv.exists():
        pt = records.read_table(tsv)
        listed = list(pt["participant_id"]) if pt is not None and "participant_id" in pt else []
    # participants.tsv rows with no run at all in the outputs
    missing = [p for p in listed if not any(w == p or w.startswith(p + "_") for w in with_outputs)]
    rows = []
    for label in sorted(set(with_outputs) | set(tbss) | set(missing)):
        why = []
        if label in missing:
            why.append("no participant-level outputs")
        if tbss and label in with_outputs and label not in tbss:
            why.append(next((m.split(": ", 1)[1] for m in summary.get("left_out", []) if m.startswith(label + ":")),
                            "left out of TBSS"))
        if stats_used is not None and label in tbss and label not in stats_used:
            why.append("left out of the statistics (no value in the tested column or covariates)")
        if seg and label in with_outputs and label not in seg:
            why.append("not segmented (no tractogram)")
        rows.append({"participant": label, "tbss": label in tbss,
                     "statistics": (label in stats_used) if stats_used is not None else None,
                     "bundles": label in seg, "notes": "; ".join(why)})
    return {"rows": rows, "left_out": summary.get("left_out", []), "n_tbss": len(tbss), "n_seg": len(seg)}


def _registration(files: GroupFiles, summary: dict, ctx: dict) -> None:
    table = records.read_table(files.skeleton_table)
    img = nib.load(str(files.registered))
    fa4d = figures.Canonical(img)
    labels = records.read_json(Path(str(files.registered).replace(".nii.gz", ".json"))).get("Volumes") \
        or list(table["label"])
    target = summary.get("target", {})
    ref_name = "the mean FA"
    if target.get("Type") == "participant" and target.get("Label") in labels:
        reference = fa4d.data[..., labels.index(target["Label"])]
        ref_name = f"the target {target['Label']}"
    else:
        ref_path = Path(target.get("Image", ""))
        try:
            ref_img = figures.Canonical.load(ref_path)
            reference = ref_img.data if ref_img.data.shape == fa4d.data.shape[:3] else None
            ref_name = f"the target image {ref_path.name}"
        except (OSError, FileNotFoundError, nib.filebasedimages.ImageFileError):
            reference = None
        if reference is None:
            reference = figures.Canonical.load(files.mean_fa).data
            ref_name = "the mean FA"
    corr = [(float(b), float(a)) for b, a in zip(table["corr_before"], table["corr_after"])]
    figures.registration_grid(fa4d.data, reference, labels, corr, fa4d.zooms, files.figure("registration"))
    ctx["figures"]["registration"] = _rel(files.figure("registration"), files.html.parent)
    ctx["registration"] = {"reference": ref_name, "rows": table.to_dict("records"),
                           "before": summary.get("mean_corr_before"), "after": summary.get("mean_corr_after")}


def _skeleton_and_stats(files: GroupFiles, summary: dict, ctx: dict) -> None:
    mean = figures.Canonical.load(files.mean_fa)
    skel = figures.Canonical.load(files.skeleton).data > 0
    overlay = np.where(skel, 1.0, np.nan)
    figures.overlay_views(mean.data, overlay, mean.zooms, files.figure("skeleton"), cmap="autumn", vmin=0, vmax=1,
                          title=f"skeleton ({int(skel.sum()):,} voxels, mean FA ≥ "
                                f"{summary.get('skeleton_threshold', '?')}) on the mean FA")
    ctx["figures"]["skeleton"] = _rel(files.figure("skeleton"), files.html.parent)
    stats = []
    for p in files.pmaps:
        from ..derivatives import parse_entities
        ents = parse_entities(p.name)
        side = records.read_json(Path(str(p).replace(".nii.gz", ".json")))
        pfwe = figures.Canonical.load(p).data
        sig = skel & (pfwe < 0.05)
        at = tuple(int(v) for v in np.argwhere(pfwe == pfwe[skel].min())[0]) if skel.any() else None
        overlay = np.where(skel, 1.0 - pfwe, np.nan)
        name = _stat_name(p)
        figures.overlay_views(mean.data, overlay, mean.zooms, files.figure(name), at=at, cmap="hot", vmin=0.9, vmax=1,
                              label="1 - FWE p", title=f"{ents.get('param', '').upper()} {ents.get('contrast')}: "
                                                       f"{int(sig.sum())} skeleton voxels with FWE p < 0.05")
        stats.append({"param": ents.get("param", "").upper(), "contrast": ents.get("contrast"),
                      "min_p": float(pfwe[skel].min()) if skel.any() else None, "n_sig": int(sig.sum()),
                      "figure": _rel(files.figure(name), files.html.parent),
                      "permutations": side.get("Permutations"), "design": side.get("Design", {})})
    ctx["stats"] = stats
    if stats:
        ctx["design"] = records.flatten({k: v for k, v in stats[0]["design"].items() if k != "Participants"})
        side = records.read_json(Path(str(files.pmaps[0]).replace(".nii.gz", ".json")))
        ctx["stats_params"] = records.flatten({k: side.get(k) for k in ("Permutations", "Seed", "TFCE",
                                                                        "DegreesOfFreedom") if k in side})
    clusters = records.read_table(files.clusters) if files.clusters else None
    ctx["clusters"] = {"columns": list(clusters.columns), "rows": clusters.to_dict("records")} \
        if clusters is not None else None


def _bundles(files: GroupFiles, ctx: dict) -> None:
    html_dir = files.html.parent
    ctx["bundle_figures"] = [{"src": _rel(p, html_dir), "label": p.name.removesuffix("_bundles.png")}
                             for p in files.bundle_figs]
    ctx["profile_figures"] = [{"src": _rel(p, html_dir), "label": p.name.removesuffix("_profiles.png")}
                              for p in files.profile_figs]
    counts = records.read_table(files.counts) if files.counts.exists() else None
    if counts is not None and len(counts):
        wide = counts.pivot_table(index=["subject", "session"], columns="tract", values="streamlines",
                                  aggfunc="first", dropna=False) if "session" in counts else None
        if wide is not None:
            wide = wide.reset_index()
            if wide["session"].isna().all():
                wide = wide.drop(columns="session")
            ctx["counts"] = {"columns": [str(c) for c in wide.columns], "rows": wide.astype(str).to_dict("records")}
    prof_side = records.read_json(files.profiles.with_suffix(".json"))
    ctx["segmentation_params"] = records.flatten(prof_side.get("SegmentationParameters", {}))
    if not files.bundle_trx or viewer.installed_bundle() is None:
        return
    bundle = viewer.copy_bundle(files.output_dir)
    choices = []
    for trx in files.bundle_trx:
        choices.append(_bundle_view(trx, files))
    ctx["viewer"] = {"key": choices[0]["key"], "script": choices[0]["script"], "choices": choices,
                     "niivue": _rel(bundle, html_dir), "niivue_version": viewer.bundle_version(viewer.installed_bundle()),
                     "caption": "bundles of the selected participant (native space)",
                     "size_mb": sum((html_dir / c["script"]).stat().st_size for c in choices) / 1e6}


def _bundle_view(trx: Path, files: GroupFiles) -> dict:
    """A display copy of one participant's bundles (at most MAX_BUNDLE_STREAMLINES per bundle)."""
    from trx.trx_file_memmap import load
    side = records.read_json(trx.with_suffix(".json"))
    order = [k for k in side.get("Counts", {}) if k != "outlier"]
    t = load(str(trx))
    try:   # copies: the arrays of a TRX are views of its memory map, gone once it is closed
        sl = t.streamlines.copy()
        groups = {k: np.array(v).ravel() for k, v in t.groups.items()}
        ref = nib.Nifti1Image(np.zeros(tuple(int(x) for x in t.header["DIMENSIONS"]), np.uint8),
                              np.array(t.header["VOXEL_TO_RASMM"], float))
    finally:
        t.close()
    names = order + sorted(set(groups) - set(order))
    keep, new_groups, n = [], {}, 0
    for k, name in enumerate(names):
        idx = groups.get(name)
        if idx is None or not len(idx):
            continue
        sel = idx[viewer.subset(len(idx), viewer.MAX_BUNDLE_STREAMLINES, seed=k)]
        keep += [sl[i] for i in sel]
        new_groups[name] = np.arange(n, n + len(sel))
        n += len(sel)
    colours = {name: list(TAB10[k % len(TAB10)]) for k, name in enumerate(names)}
    vox = float(np.min(np.linalg.norm(ref.affine[:3, :3], axis=0))) or 2.0
    label = trx.name.split("_track-")[0]
    script = files.viewer_script(trx)
    viewer.write_data_script(script, label, [{"name": "bundles.trx", "kind": "mesh", "groupColors": colours,
                                              "radius": round(0.12 * vox, 2) if n <= 3000 else 0,
                                              "bytes": viewer.trx_bytes(keep, ref, spacing=vox, groups=new_groups)}])
    return {"key": label, "label": f"{label} ({n:,} streamlines shown)", "script": _rel(script, files.html.parent),
            "legend": [{"name": k, "rgb": "rgb(%d,%d,%d)" % tuple(colours[k])} for k in names if k in new_groups]}


def _software(output_dir: Path) -> list[dict]:
    desc = records.read_json(Path(output_dir) / "dataset_description.json")
    rows = []
    for g in desc.get("GeneratedBy", []):
        rows.append({"name": g.get("Name"), "version": g.get("Version", ""),
                     "where": "dataset_description.json" + (f" (container {g['Container']})" if g.get("Container") else "")})
    return rows


def write_group_report(output_dir: Path, bids_dir: Path | None = None) -> Path:
    """Write ``group/report.html`` from the group outputs on disk; returns its path."""
    files = GroupFiles(output_dir)
    side = records.read_json(files.skeleton_table.with_suffix(".json")) if files.skeleton_table else {}
    summary = side.get("Summary", {})
    ctx = {"version": __version__, "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "output_dir": str(output_dir),
           "figures": {}, "summary": summary, "registration": None, "stats": [], "clusters": None, "design": [],
           "stats_params": [], "bundle_figures": [], "profile_figures": [], "counts": None, "viewer": None,
           "segmentation_params": [], "target": None}
    ctx["participants"] = _participants(files, summary, bids_dir)
    if files.target_scores is not None:
        t = records.read_table(files.target_scores)
        meta = records.read_json(files.target_scores.with_suffix(".json"))
        ctx["target"] = {"columns": list(t.columns), "rows": t.to_dict("records"), "chosen": meta.get("Chosen"),
                         "description": meta.get("Description", ""),
                         "settings": records.flatten(meta.get("Settings", {}))}
    if files.registered is not None and files.skeleton_table is not None:
        _registration(files, summary, ctx)
    if files.mean_fa is not None and files.skeleton is not None:
        _skeleton_and_stats(files, summary, ctx)
    _bundles(files, ctx)
    logs = files.logs[-1:]
    ctx["warnings"] = records.log_warnings(logs)
    ctx["logs"] = [_rel(p, files.html.parent) for p in logs]
    ctx["software"] = _software(output_dir)
    return render_to(files.html, "group.html.j2", ctx)
