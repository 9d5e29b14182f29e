"""The participant report: ``output_dir/<run label>.html`` with its figures in ``sub-X[/ses-Y]/figures/``.

One section per stage, drawn from what the stages wrote (maps, tractogram, sidecars, completion
records, log warnings) and from the run's input gradient table; nothing is fitted or tracked again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..derivatives import sidecar_path
from ..stages import StageSkipped
from . import figures, records, viewer
from .render import relative as _rel
from .render import render_to

log = logging.getLogger(__name__)

FIGURES = ("gradients", "mask", "maps", "odf", "streamlines")


def report_paths(out, output_dir: Path) -> dict:
    """Every file the participant report writes (the report stage's outputs)."""
    fig_dir = out.dir.parent / "figures"
    label = out.label
    paths = {"html": Path(output_dir) / f"{label}.html"}
    for name in FIGURES:
        if name == "streamlines" and not out.tracking:
            continue
        paths[name] = fig_dir / f"{label}_desc-{name}_report.png"
    if out.tracking and viewer.installed_bundle() is not None:
        paths["viewer"] = fig_dir / f"{label}_desc-viewer_report.js"
        paths["niivue"] = Path(output_dir).joinpath(*viewer.OUTPUT_SUBDIR, viewer.BUNDLE)
    return paths


def _stage_rows(recs: dict, expected: list[str]) -> list[dict]:
    rows = []
    for name in expected:
        rec = recs.get(name)
        rows.append({"stage": name, "status": "complete" if rec else "not run",
                     "seconds": rec.get("seconds") if rec else None, "finished": rec.get("finished") if rec else "",
                     "version": rec.get("version") if rec else "", "pid": rec.get("pid") if rec else ""})
    return rows


def _gradients(bval: Path | None, bvec: Path | None, affine: np.ndarray):
    """(table rows, shells) from the run's input .bval/.bvec; world directions for the sphere plot."""
    from ..gradients import fsl_to_voxel_bvecs, read_bvals_bvecs, voxel_to_world_dirs
    from ..models import B0_THRESHOLD
    if bval is None or bvec is None or not Path(bval).exists() or not Path(bvec).exists():
        return None
    bvals, bvecs = read_bvals_bvecs(bval, bvec)
    world = voxel_to_world_dirs(fsl_to_voxel_bvecs(bvecs, affine), affine)
    norms = np.linalg.norm(world, axis=1, keepdims=True)
    world = np.divide(world, norms, out=np.zeros_like(world), where=norms > 0)
    rounded = np.round(bvals, -2)
    shells = []
    for b in sorted(set(rounded[bvals > B0_THRESHOLD])):
        shells.append((float(b), (rounded == b) & (bvals > B0_THRESHOLD)))
    rows = [{"b": "0 (b ≤ %g)" % B0_THRESHOLD, "volumes": int((bvals <= B0_THRESHOLD).sum()),
             "range": ""}]
    for b, sel in shells:
        rows.append({"b": f"{b:g}", "volumes": int(sel.sum()),
                     "range": f"{bvals[sel].min():g}–{bvals[sel].max():g}"})
    return {"rows": rows, "shells": shells, "bvals": bvals, "world": world, "n": len(bvals),
            "files": [Path(bval).name, Path(bvec).name]}


def _to_sh_frame(side: dict, affine: np.ndarray) -> np.ndarray:
    """3x3 matrix: world direction -> the frame of the SH coefficients (their sidecar's Reference)."""
    from kernels.frames import voxel_frame
    ref = (side.get("OrientationEncoding") or {}).get("Reference", "ijk")
    return np.eye(3) if ref == "xyz" else voxel_frame(affine).T


def _tractogram(path: Path):
    """(all lengths in mm, display subset of streamlines, count) of a TRX/TCK/TRK file."""
    from ..group.bundles.app import load_streamlines
    sl = load_streamlines(path)
    lengths = None
    if path.suffix == ".trx":
        from trx.trx_file_memmap import load
        trx = load(str(path))
        try:
            if "length" in trx.data_per_streamline:
                lengths = np.array(trx.data_per_streamline["length"], np.float64).ravel()  # a copy
        finally:
            trx.close()
    if lengths is None or len(lengths) != len(sl):
        lengths = np.array([np.linalg.norm(np.diff(s, axis=0), axis=1).sum() for s in sl])
    return sl, lengths


def write_participant_report(out, output_dir: Path, *, bval: Path | None = None, bvec: Path | None = None,
                             stages: list[str] | None = None) -> Path:
    """Write the report of one DWI run (``out``: the run's :class:`~bids_app.workflows.participant.Outputs`)
    from the files on disk; returns the HTML path."""
    output_dir = Path(output_dir)
    paths = report_paths(out, output_dir)
    label = out.label
    needed = [out.tensor("fa"), out.tensor("md"), out.tensor("rgb"), out.mask, out.meanb0, out.sh]
    missing = [p.name for p in needed + ([out.tractogram] if out.tracking else []) if not p.exists()]
    if missing:   # (only --reports-only gets here: in a run, the report stage comes after the others)
        raise StageSkipped(f"no report yet: {', '.join(missing)} missing (run the participant level)")
    prefix = f"{label}_"
    recs = records.stage_records(out.records, prefix)
    stages = stages or [k for k in recs if k != "report"]
    sections_missing = []

    sidecars = {}
    for p in sorted(out.dir.glob(f"{label}_*.json")):
        sidecars[p.name] = records.read_json(p)
    fa_side = sidecars.get(sidecar_path(out.tensor("fa")).name, {})
    notes, checks = records.sidecar_notes(sidecars)

    ctx = {"label": label, "version": __version__, "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
           "output_dir": str(output_dir), "stages": _stage_rows(recs, stages), "sources": fa_side.get("Sources", []),
           "figures": {}, "notes": notes,
           "checks": {name: records.flatten(val if isinstance(val, (dict, list)) else {"result": val})
                      for name, val in checks.items()}}

    def fig(name):
        return _rel(paths[name], output_dir)

    # ---------------------------------------------------------------- maps (dti stage)
    have_dti = all(p.exists() for p in (out.tensor("fa"), out.tensor("md"), out.tensor("rgb"), out.mask,
                                        out.meanb0))
    affine = None
    if have_dti:
        fa_img = nib.load(str(out.tensor("fa")))
        affine = fa_img.affine
        fa = figures.Canonical(fa_img)
        mask = figures.Canonical.load(out.mask).data > 0
        b0 = figures.Canonical.load(out.meanb0).data
        md = figures.Canonical.load(out.tensor("md")).data
        rgb = figures.Canonical.load(out.tensor("rgb")).data
        at = figures.centre(mask)
        zooms = fa.zooms
        ctx["geometry"] = {"shape": "×".join(map(str, fa_img.shape[:3])),
                           "voxel": "×".join(f"{z:g}" for z in fa_img.header.get_zooms()[:3]),
                           "orientation": "".join(nib.aff2axcodes(affine)),
                           "brain_voxels": int(mask.sum()),
                           "median_fa": float(np.median(fa.data[mask])) if mask.any() else float("nan")}
        figures.slice_rows([("mean b=0", b0, "gray", 0, figures.robust_max(b0, mask))], zooms, at, paths["mask"],
                           contour=mask)
        figures.slice_rows([("FA", fa.data, "gray", 0, 1), ("colour FA", rgb, None, 0, 1),
                            ("MD (mm²/s)", md, "viridis", 0, figures.robust_max(md, mask))], zooms, at,
                           paths["maps"])
        ctx["figures"].update(mask=fig("mask"), maps=fig("maps"))
        ctx["dti"] = {"model": (fa_side.get("Model") or {}), "params": records.flatten(fa_side.get("Model", {}))}
    else:
        sections_missing.append("dti")

    # ---------------------------------------------------------------- gradient table (inputs)
    grad = _gradients(bval, bvec, affine) if affine is not None else None
    if grad is not None:
        figures.gradient_figure(grad["bvals"], grad["world"], grad["shells"], paths["gradients"])
        ctx["figures"]["gradients"] = fig("gradients")
        ctx["gradients"] = {k: grad[k] for k in ("rows", "n", "files")}

    # ---------------------------------------------------------------- ODF
    sh_side = records.read_json(sidecar_path(out.sh))
    if out.sh.exists() and have_dti and sh_side:
        sh_img = nib.load(str(out.sh))
        order = int(sh_side["OrientationEncoding"]["SphericalHarmonicDegree"])
        raw_mask = np.asarray(nib.load(str(out.mask)).dataobj) > 0
        raw_fa = np.asarray(fa_img.dataobj, np.float32)
        figures.odf_glyph_figure(np.asarray(sh_img.dataobj, np.float32), order, _to_sh_frame(sh_side, affine),
                                 sh_img.affine, raw_fa, raw_mask, paths["odf"])
        ctx["figures"]["odf"] = fig("odf")
        requested = (sh_side.get("tractoscale") or {}).get("Parameters", {}).get("SHOrder")
        ctx["odf"] = {"model": out.odf_model, "order": order, "requested": requested,
                      "frame": sh_side["OrientationEncoding"].get("Reference"),
                      "params": records.flatten((sh_side.get("Model") or {}).get("Parameters", {}))}
    else:
        sections_missing.append("odf")

    # ---------------------------------------------------------------- tractography
    if out.tracking:
        trk_side = records.read_json(sidecar_path(out.tractogram))
        if out.tractogram.exists() and trk_side:
            sl, lengths = _tractogram(out.tractogram)
            keep = viewer.subset(len(sl), 5000, seed=1)
            figures.streamline_views([sl[i] for i in keep], lengths, paths["streamlines"],
                                     title=f"{len(keep):,} of {len(sl):,} streamlines, coloured by end-to-end direction")
            ctx["figures"]["streamlines"] = fig("streamlines")
            ctx["tracking"] = {
                "file": out.tractogram.name, "n_streamlines": trk_side.get("NumberOfStreamlines", len(sl)),
                "n_seeds": trk_side.get("NumberOfSeeds"), "seeds_per_s": trk_side.get("SeedsPerSecond"),
                "device": trk_side.get("Device"), "time": trk_side.get("TrackingTime"),
                "median_length": float(np.median(lengths)) if len(lengths) else None,
                "params": records.flatten({k: trk_side[k] for k in ("StreamlineSeeding", "StreamlinePropagation",
                                                                    "StreamlineTermination",
                                                                    "StreamlineAcceptanceCriteria")
                                           if k in trk_side})}
            if "viewer" in paths and have_dti:
                ctx["viewer"] = _viewer_data(out, sl, fa_img, paths, output_dir)
        else:
            sections_missing.append("tracking")

    # ---------------------------------------------------------------- QC figure of the qc stage
    if out.qc_figure.exists():
        ctx["figures"]["qc"] = _rel(out.qc_figure, output_dir)

    # ---------------------------------------------------------------- warnings, parameters
    logs = records.run_logs(output_dir / "logs", label, list(recs.values()))
    ctx["warnings"] = records.log_warnings(logs)
    # a downgrade the run also logged is listed once (the log line, with its time)
    ctx["notes"] = [n for n in notes if not any(n["message"] in w["message"] for w in ctx["warnings"])]
    ctx["logs"] = [_rel(p, output_dir) for p in logs]
    ctx["missing"] = sections_missing
    ctx["parameters"] = [{"stage": name, "rows": records.flatten(rec.get("params", {})),
                          "version": rec.get("version")} for name, rec in recs.items() if name != "report"]
    ctx["software"] = _software(sidecars, recs)
    return render_to(paths["html"], "participant.html.j2", ctx)


def _viewer_data(out, sl, fa_img, paths, output_dir) -> dict:
    """Display copies (FA and a subset of the streamlines) for the 3D view, and where the page finds them."""
    bundle = viewer.copy_bundle(output_dir)
    keep = viewer.subset(len(sl), viewer.MAX_STREAMLINES)
    vox = float(np.min(fa_img.header.get_zooms()[:3]))
    fa = np.asarray(fa_img.dataobj, np.float32)
    items = [{"name": "fa.nii.gz", "kind": "volume", "bytes": viewer.volume_bytes(fa, fa_img.affine, 1.0)},
             {"name": "tractogram.trx", "kind": "mesh", "color": "direction",
              "radius": round(0.12 * vox, 2) if len(keep) <= 3000 else 0,
              "bytes": viewer.trx_bytes([sl[i] for i in keep], fa_img, spacing=vox)}]
    viewer.write_data_script(paths["viewer"], out.label, items)
    return {"key": out.label, "script": _rel(paths["viewer"], output_dir),
            "niivue": _rel(bundle, output_dir), "niivue_version": viewer.bundle_version(viewer.installed_bundle()),
            "shown": len(keep), "total": len(sl), "spacing": vox,
            "caption": f"{out.label}: {len(keep):,} of {len(sl):,} streamlines over FA",
            "size_mb": paths["viewer"].stat().st_size / 1e6}


def _software(sidecars: dict, recs: dict) -> list[dict]:
    """Software versions named in the sidecars and records."""
    rows = {}
    for rec in recs.values():
        if rec.get("version"):
            rows.setdefault(("tractoscale", rec["version"]), []).append(f"stage record {rec.get('stage')}")
    for name, side in sidecars.items():
        v = (side.get("tractoscale") or {}).get("Version")
        if v:
            rows.setdefault(("tractoscale", v), []).append(name)
        model = side.get("Model") or {}
        if model.get("URL"):
            rows.setdefault((model.get("Description", "model"), model["URL"]), []).append(name)
    return [{"name": k[0], "version": k[1], "where": ", ".join(sorted(set(v))[:3]) + (" ..." if len(set(v)) > 3 else "")}
            for k, v in rows.items()]
