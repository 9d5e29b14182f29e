"""Group-level bundle segmentation: find the participants' tractograms, label them against the
atlas (one task per participant on the executor), write bundles, counts, tract profiles and
figures (see :mod:`.outputs` for the file layout)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ... import __version__
from ...config import OT_REACH, OT_REACH_DEMO, SEG_TRACKS, Segmentation
from ...derivatives import TENSOR_SCALARS, TRACTOGRAM_FORMATS, parse_entities, run_label, sidecar_path, tensor_map_path
from ...errors import InputDataError, NoInputError, NoMatchError
from ...stages import Stage
from . import outputs
from .atlas import DEMO_ATLAS, find_atlas, load_atlas
from .fibres import orient_to, resample
from .ot import OTParams
from .segment import segment
from .space import to_atlas_space

log = logging.getLogger(__name__)

TRACK_ORDER = SEG_TRACKS
TRACTOGRAM_EXTENSIONS = tuple(f".{f}" for f in TRACTOGRAM_FORMATS)
SCALARS = TENSOR_SCALARS


# --------------------------------------------------------------------------- options

def default_reach(options: Segmentation, atlas_path: Path) -> float:
    """``--ot-reach``, or its default for this atlas (the demo phantom is half brain size)."""
    if options.ot_reach is not None:
        return float(options.ot_reach)
    if Path(atlas_path).name == DEMO_ATLAS.name:
        log.info("demo atlas: --ot-reach defaults to %.0f mm (phantom scale)", OT_REACH_DEMO)
        return OT_REACH_DEMO
    return OT_REACH


def _atlas_space(path: Path, given: str | None) -> str | None:
    if given:
        return given
    name = Path(path).name
    if name.startswith("tpl-"):
        return name[4:].split("_")[0]
    return None


# --------------------------------------------------------------------------- inputs

def find_tractograms(output_dir: Path, participants, track: str, sessions=None) -> list[dict]:
    """One entry per participant run: its whole-brain tractogram and tensor maps."""
    output_dir = Path(output_dir)
    sessions = {str(s).removeprefix("ses-") for s in sessions} if sessions else None
    wanted = None
    if participants:
        wanted = {str(p["sub"] if isinstance(p, dict) else p).removeprefix("sub-") for p in participants}
    runs: dict = {}
    found = [p for ext in TRACTOGRAM_EXTENSIONS for p in output_dir.glob(f"sub-*/**/dwi/*_tractogram{ext}")]
    for p in sorted(found):
        ents = parse_entities(p.name)
        if "track" not in ents or "tract" in ents or "desc" in ents or "space" in ents:
            continue  # our own outputs, or tractograms not in native space
        if wanted is not None and ents.get("sub") not in wanted:
            continue
        if sessions is not None and ents.get("ses") not in sessions:
            continue
        key = tuple((k, v) for k, v in ents.items() if k != "track")
        prev = runs.setdefault(key, {}).get(ents["track"])
        if prev is None or TRACTOGRAM_EXTENSIONS.index(p.suffix) < TRACTOGRAM_EXTENSIONS.index(prev.suffix):
            runs[key][ents["track"]] = p
    if wanted is not None:
        found = {dict(k)["sub"] for k in runs}
        missing = sorted(wanted - found)
        if missing:
            raise NoMatchError(f"no tractogram for participant(s) {', '.join(missing)} in {output_dir}")
    jobs = []
    for key, by_track in sorted(runs.items()):
        ents = dict(key)
        order = TRACK_ORDER if track == "auto" else (track,)
        chosen = next((t for t in order if t in by_track), None)
        if chosen is None:
            raise NoInputError(f"sub-{ents['sub']}: no track-{track} tractogram (found: "
                               f"{', '.join(sorted(by_track))})")
        d = by_track[chosen].parent
        maps = {}
        for s in SCALARS:
            mp = tensor_map_path(d, ents, s)
            if mp.exists():
                maps[s] = str(mp)
        if "fa" not in maps:
            raise NoInputError(f"sub-{ents['sub']}: FA map missing next to {by_track[chosen].name}")
        jobs.append({"entities": ents, "track": chosen, "tractogram": str(by_track[chosen]), "maps": maps})
    if not jobs:
        raise NoInputError(f"no participant tractograms (*_track-*_tractogram.trx|tck|trk) in {output_dir}")
    return jobs


def load_streamlines(path: Path):
    """Streamlines (RAS+ mm, in memory) of a TRX, TCK or TRK file."""
    path = Path(path)
    if path.suffix != ".trx":
        try:
            return nib.streamlines.load(str(path)).streamlines.copy()   # nibabel returns RAS+ mm
        except Exception as exc:
            raise InputDataError(f"cannot read tractogram {path}: {exc}") from None
    from ...trx_reader import open_trx

    try:
        with open_trx(path) as trx:
            return trx.streamlines.copy()
    except Exception as exc:
        raise InputDataError(f"cannot read tractogram {path}: {exc}") from None


# --------------------------------------------------------------------------- one participant

def _params_record(options: Segmentation, reach: float, atlas_path: str, atlas_space) -> dict:
    return {"Method": options.seg_method, "Atlas": str(atlas_path), "AtlasSpace": atlas_space,
            "Transform": options.seg_transform, "Blur": options.ot_blur, "Reach": reach,
            "Scaling": options.ot_scaling, "OutlierLevel": options.ot_outlier_level,
            "Clusters": options.ot_clusters, "AtlasMaxFibresPerBundle": options.atlas_max_fibres,
            "AtlasFragments": options.fragments, "ProfileNodes": options.n_profile_nodes, "Version": __version__}


def participant_stage(job: dict, options: Segmentation, reach: float, atlas_path: str, output_dir: Path,
                      names) -> Stage:
    """The stage of one participant's segmentation: its outputs, parameters and input files (the
    tractogram, the tensor maps, the atlas and the participant's TBSS transforms)."""
    from ..transforms import xfm_dir
    ents = job["entities"]
    paths = outputs.participant_paths(output_dir, ents, job["track"], names)
    xfms = sorted(xfm_dir(output_dir).glob(f"{run_label(ents)}_from-*_xfm.nii.gz")) \
        if options.seg_transform in ("auto", "tbss") else []
    record = _params_record(options, reach, atlas_path, _atlas_space(Path(atlas_path), options.atlas_space))
    return Stage(f"{run_label(ents)}_track-{job['track']}_bundles",
                 outputs=(paths["bundles"], sidecar_path(paths["bundles"]), paths["profiles"], paths["counts"]),
                 params={**{k: v for k, v in record.items() if k != "Version"}, "Atlas": Path(atlas_path).name},
                 files=(job["tractogram"], *job["maps"].values(), atlas_path, *xfms))


def segment_participant(job: dict, options: Segmentation, reach: float, atlas_path: str, output_dir: str,
                        device: str, stage: Stage) -> dict:
    """Segment one participant's tractogram and write its outputs (an executor task)."""
    with stage.running():
        return _segment(job, options, reach, atlas_path, Path(output_dir), device)


def _segment(job: dict, options: Segmentation, reach: float, atlas_path: str, output_dir: Path,
             device: str) -> dict:
    from kernels.device import select_device
    from kernels.sinkhorn import get_backend

    t0 = time.perf_counter()
    ents = job["entities"]
    atlas_space = _atlas_space(Path(atlas_path), options.atlas_space)
    record = _params_record(options, reach, atlas_path, atlas_space)
    atlas = load_atlas(atlas_path, max_per_bundle=options.atlas_max_fibres)
    paths = outputs.participant_paths(output_dir, ents, job["track"], atlas.names)
    if options.fragments:   # 10x the atlas fibres (same bundle names)
        atlas = atlas.with_fragments()

    native = load_streamlines(Path(job["tractogram"]))
    common, mapping = to_atlas_space(native, atlas, output_dir=output_dir, entities=ents,
                                     mode=options.seg_transform, atlas_space=atlas_space)
    backend = get_backend(select_device(device))
    params = OTParams(blur=options.ot_blur, reach=reach, scaling=options.ot_scaling,
                      outlier_level=options.ot_outlier_level, n_clusters=options.ot_clusters)
    pts = resample(common, atlas.npts) if len(common) else np.zeros((0, atlas.npts, 3))
    seg = segment(common, atlas, options.seg_method, params, backend, points=pts)

    # orientation of every labelled streamline against its atlas bundle's mean fibre
    flips = np.zeros(len(native), bool)
    cents = atlas.centroids()
    for k in range(len(atlas.names)):
        idx = np.flatnonzero(seg.labels == k)
        if len(idx):
            flips[idx] = orient_to(pts[idx], cents[k])

    fa_img = nib.load(job["maps"]["fa"])
    sidecar = {"Description": "streamlines of the participant's tractogram labelled by atlas-based bundle "
                              "segmentation (native RAS+ mm)",
               "Sources": [job["tractogram"]], "SegmentationParameters": record,
               "MappingToAtlas": mapping.describe(), "Counts": seg.counts(), "Stats": _jsonable(seg.stats)}
    files = _write_bundles(paths, native, seg, flips, fa_img, sidecar)

    imgs = {s: nib.load(p) for s, p in job["maps"].items()}
    maps = {s: (np.asarray(img.dataobj, np.float64), img.affine) for s, img in imgs.items()}
    rows = _profiles(native, seg, flips, maps, ents, options.n_profile_nodes)
    scalars = [s for s in SCALARS if s in maps]
    prof = pd.DataFrame(rows, columns=list(outputs.PROFILE_COLUMNS) + scalars)
    outputs.write_tsv(paths["profiles"], prof,
                      {**outputs.profile_sidecar(scalars), "SegmentationParameters": record,
                       "Sources": [job["tractogram"]] + list(job["maps"].values())})
    counts = _counts_table(seg.counts(), ents)
    outputs.write_tsv(paths["counts"], counts,
                      {"tract": {"Description": "bundle name as in the atlas ('outlier': no bundle)"},
                       "streamlines": {"Description": "number of streamlines labelled with the bundle"},
                       "SegmentationParameters": record})
    files += [str(paths["profiles"]), str(paths["counts"])]

    fig = outputs.group_dir(output_dir) / "figures" / f"{run_label(ents)}_bundles.png"
    from .figures import plot_bundles
    plot_bundles(pts, seg.labels, atlas.names, fig, title=f"{run_label(ents)}: bundles in atlas space")
    files.append(str(fig))
    log.info("%s: %s in %.1f s", run_label(ents), seg.counts(), time.perf_counter() - t0)
    return {"entities": ents, "counts": seg.counts(), "profiles": prof, "files": files,
            "stats": _jsonable(seg.stats), "cached": False}


def _cached(stage: Stage, job: dict) -> dict:
    """The result of a complete stage, read back from its outputs."""
    bundles, side, profiles, counts = stage.outputs
    meta = json.loads(side.read_text())
    log.info("%s: outputs up to date, reused", run_label(job["entities"]))
    return {"entities": job["entities"], "counts": meta.get("Counts", {}), "profiles": outputs.read_tsv(profiles),
            "files": [str(p) for p in stage.outputs], "stats": meta.get("Stats", {}), "cached": True}


def _write_bundles(paths, native, seg, flips, reference, sidecar) -> list:
    files = []
    keep = np.flatnonzero(seg.labels >= 0)
    order = keep[np.argsort(seg.labels[keep], kind="stable")]
    sl = native[order]
    # store every streamline oriented like its atlas bundle (node 0 at the same end)
    oriented = [s[::-1] if f else s for s, f in zip(sl, flips[order])]
    lab = seg.labels[order]
    groups = {n: np.flatnonzero(lab == k) for k, n in enumerate(seg.names)}
    outputs.write_trx(paths["bundles"], oriented, reference, groups=groups, sidecar=sidecar,
                      source_index=order)
    files.append(str(paths["bundles"]))
    for k, name in enumerate(seg.names):
        sel = np.flatnonzero(lab == k)
        if not len(sel):
            continue
        outputs.write_trx(paths["tracts"][name], [oriented[i] for i in sel], reference,
                          sidecar={**{kk: v for kk, v in sidecar.items() if kk not in ("Counts", "Stats")},
                                   "TractName": name, "StreamlineCount": int(len(sel))},
                          source_index=order[sel])
        files.append(str(paths["tracts"][name]))
    return files


def _profiles(native, seg, flips, maps, ents, n_nodes) -> list:
    from .profiles import bundle_profiles

    rows = []
    for k, name in enumerate(seg.names):
        idx = np.flatnonzero(seg.labels == k)
        if not len(idx):
            continue
        prof = bundle_profiles(native[idx], flips[idx], maps, n_nodes)
        for node in range(n_nodes):
            row = [ents["sub"], ents.get("ses"), name, node]
            row += [float(prof[s][node]) for s in SCALARS if s in prof]
            rows.append(row)
    return rows


def _counts_table(counts: dict, ents: dict) -> pd.DataFrame:
    """One row per bundle (and 'outlier'): subject, session, tract, streamlines."""
    return pd.DataFrame({"subject": ents["sub"], "session": ents.get("ses"),
                         "tract": list(counts), "streamlines": list(counts.values())})


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else
                                 (list(o) if isinstance(o, (tuple, np.ndarray)) else str(o))))


# --------------------------------------------------------------------------- group

def _groups(bids_dir: Path) -> dict:
    """``{subject: group}`` from participants.tsv (column 'group'), if any."""
    p = Path(bids_dir) / "participants.tsv"
    try:
        t = pd.read_csv(p, sep="\t", dtype=str)
    except (OSError, ValueError):
        return {}
    if "group" not in t.columns or "participant_id" not in t.columns:
        return {}
    return {str(s).removeprefix("sub-"): g for s, g in zip(t["participant_id"], t["group"])
            if isinstance(g, str)}


def run_segmentation(*, bids_dir, output_dir, participants, options: Segmentation, executor,
                     device: str = "auto", sessions=None, force: bool = False, progress: bool = True) -> dict:
    """Segment every selected participant (one stage each) and write the group tables and figures."""
    output_dir = Path(output_dir)
    atlas_path = find_atlas(bids_dir, options.atlas)
    reach = default_reach(options, atlas_path)
    atlas = load_atlas(atlas_path, max_per_bundle=options.atlas_max_fibres)   # fail early on a bad atlas
    jobs = find_tractograms(output_dir, participants, options.seg_track, sessions)
    log.info("bundle segmentation (%s) of %d participant run(s) with atlas %s (%d bundles)",
             options.seg_method, len(jobs), atlas_path, len(atlas.names))
    stages = [participant_stage(job, options, reach, str(atlas_path), output_dir, atlas.names) for job in jobs]
    results = {i: _cached(st, job) for i, (st, job) in enumerate(zip(stages, jobs))
               if not force and st.is_complete()}
    todo = [i for i in range(len(jobs)) if i not in results]
    calls = [((jobs[i], options, reach, str(atlas_path), str(output_dir), device, stages[i]), {}) for i in todo]
    if executor is None:
        from tqdm import tqdm
        for i, (args_, _) in zip(todo, tqdm(calls, desc="bundle segmentation", unit="participant",
                                            disable=None if progress else True)):
            results[i] = segment_participant(*args_)
    else:
        from ..executor import run_tasks
        for k, res in run_tasks(executor, segment_participant, calls, desc="bundle segmentation",
                                disable_progress=None if progress else True):
            results[todo[k]] = res
    results = [results[i] for i in range(len(jobs))]

    gdir = outputs.group_dir(output_dir)
    prof = pd.concat([r["profiles"] for r in results], ignore_index=True)
    table = outputs.update_group_table(gdir / "tract_profiles.tsv", prof)
    scalars = [s for s in SCALARS if s in table.columns]
    from ...derivatives import write_json
    record = _params_record(options, reach, str(atlas_path), _atlas_space(atlas_path, options.atlas_space))
    write_json(gdir / "tract_profiles.json", {**outputs.profile_sidecar(scalars),
                                              "SegmentationParameters": record})
    counts = pd.concat([_counts_table(r["counts"], r["entities"]) for r in results], ignore_index=True)
    outputs.update_group_table(gdir / "bundle_counts.tsv", counts)

    groups = _groups(bids_dir)
    figs = []
    from .figures import plot_profiles
    for name in table["tract"].dropna().unique():
        sub = table[table["tract"] == name]
        figs.append(str(plot_profiles(sub, name, gdir / "figures" / f"tract-{outputs.tract_label(name)}"
                                      "_profiles.png", groups, scalars)))
    return {"participants": len(results), "atlas": str(atlas_path), "method": options.seg_method,
            "counts": {run_label(r["entities"]): r["counts"] for r in results},
            "profiles": str(gdir / "tract_profiles.tsv"), "figures": figs,
            "reused": sum(bool(r.get("cached")) for r in results)}
