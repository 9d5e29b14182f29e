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
from ...derivatives import TENSOR_SCALARS, TRACTOGRAM_FORMATS, parse_entities, run_label, sidecar_path, tensor_map_path
from ...errors import InputDataError, NoInputError, NoMatchError, UsageError
from . import outputs
from .atlas import DEMO_ATLAS, find_atlas, load_atlas
from .fibres import orient_to, resample
from .ot import OTParams
from .segment import METHODS, segment
from .space import MODES, to_atlas_space

log = logging.getLogger(__name__)

TRACK_ORDER = ("prob", "ptt", "det", "boot")
TRACTOGRAM_EXTENSIONS = tuple(f".{f}" for f in TRACTOGRAM_FORMATS)
SCALARS = TENSOR_SCALARS
DEFAULT_REACH = 20.0
DEMO_REACH = 5.0   # the demo phantom is about half the size of a human brain, at 2.5 mm voxels


# --------------------------------------------------------------------------- options

def seg_options(args) -> dict:
    """Validated segmentation options from the parsed arguments (plain dict, picklable)."""
    def opt(name, default=None):
        v = getattr(args, name, None)
        return default if v is None else v

    o = {
        "method": opt("seg_method", "ot"),
        "transform": opt("seg_transform", "auto"),
        "track": opt("seg_track", "auto"),
        "blur": float(opt("ot_blur", 3.0)),
        "reach": opt("ot_reach"),
        "scaling": float(opt("ot_scaling", 0.9)),
        "outlier_level": float(opt("ot_outlier_level", 0.2)),
        "clusters": opt("ot_clusters"),
        "atlas_max": opt("atlas_max_fibres"),
        "nodes": int(opt("n_profile_nodes", 100)),
        "device": opt("device", "auto"),
        "force": bool(opt("force", False)),
        "atlas_space": opt("atlas_space"),
        "fragments": not bool(opt("no_atlas_fragments", False)),
    }
    if o["method"] not in METHODS:
        raise UsageError(f"--seg-method must be one of {', '.join(METHODS)}")
    if o["transform"] not in MODES:
        raise UsageError(f"--seg-transform must be one of {', '.join(MODES)}")
    if o["track"] != "auto" and o["track"] not in TRACK_ORDER:
        raise UsageError(f"--seg-track must be auto or one of {', '.join(TRACK_ORDER)}")
    if not o["blur"] > 0:
        raise UsageError("--ot-blur must be > 0 (mm)")
    if o["reach"] is not None and not float(o["reach"]) > 0:
        raise UsageError("--ot-reach must be > 0 (mm)")
    if not 0 < o["scaling"] < 1:
        raise UsageError("--ot-scaling must be between 0 and 1")
    if not 0 <= o["outlier_level"] < 1:
        raise UsageError("--ot-outlier-level must be in [0, 1)")
    if o["clusters"] is not None and int(o["clusters"]) < 1:
        raise UsageError("--ot-clusters must be >= 1")
    if o["atlas_max"] is not None and int(o["atlas_max"]) < 1:
        raise UsageError("--atlas-max-fibres must be >= 1")
    if o["nodes"] < 2:
        raise UsageError("--n-profile-nodes must be >= 2")
    return o


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
    from trx.trx_file_memmap import load

    try:
        trx = load(str(path))
    except Exception as exc:
        raise InputDataError(f"cannot read tractogram {path}: {exc}") from None
    try:
        return trx.streamlines.copy()
    finally:
        trx.close()


# --------------------------------------------------------------------------- one participant

def _params_record(opts: dict, atlas_path: str, atlas_space) -> dict:
    return {"Method": opts["method"], "Atlas": str(atlas_path), "AtlasSpace": atlas_space,
            "Transform": opts["transform"], "Blur": opts["blur"], "Reach": opts["reach"],
            "Scaling": opts["scaling"], "OutlierLevel": opts["outlier_level"],
            "Clusters": opts["clusters"], "AtlasMaxFibresPerBundle": opts["atlas_max"],
            "AtlasFragments": opts["fragments"], "ProfileNodes": opts["nodes"], "Version": __version__}


def segment_participant(job: dict, opts: dict, atlas_path: str, output_dir: str) -> dict:
    """Segment one participant's tractogram and write its outputs (an executor task)."""
    from kernels.device import select_device
    from kernels.sinkhorn import get_backend

    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    ents = job["entities"]
    atlas_space = _atlas_space(Path(atlas_path), opts["atlas_space"])
    record = _params_record(opts, atlas_path, atlas_space)
    atlas = load_atlas(atlas_path, max_per_bundle=opts["atlas_max"])
    paths = outputs.participant_paths(output_dir, ents, job["track"], atlas.names)
    cached = _cached(paths, record, job, opts)
    if cached is not None:
        return cached
    if opts["fragments"]:   # only when there is work: 10x the atlas fibres (same bundle names)
        atlas = atlas.with_fragments()

    native = load_streamlines(Path(job["tractogram"]))
    common, mapping = to_atlas_space(native, atlas, output_dir=output_dir, entities=ents,
                                     mode=opts["transform"], atlas_space=atlas_space)
    backend = get_backend(select_device(opts["device"]))
    params = OTParams(blur=opts["blur"], reach=opts["reach"], scaling=opts["scaling"],
                      outlier_level=opts["outlier_level"], n_clusters=opts["clusters"])
    pts = resample(common, atlas.npts) if len(common) else np.zeros((0, atlas.npts, 3))
    seg = segment(common, atlas, opts["method"], params, backend, points=pts)

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
    rows = _profiles(native, seg, flips, maps, ents, opts["nodes"])
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


def _cached(paths, record, job, opts):
    """The previous result if its outputs exist and were made with the same parameters."""
    if opts["force"]:
        return None
    side = sidecar_path(paths["bundles"])
    need = [paths["bundles"], side, paths["profiles"], paths["counts"]]
    if not all(p.exists() for p in need):
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("SegmentationParameters") != json.loads(json.dumps(record)) or \
            meta.get("Sources") != [job["tractogram"]]:
        return None
    prof = outputs.read_tsv(paths["profiles"])
    log.info("%s: outputs up to date, reused", run_label(job["entities"]))
    return {"entities": job["entities"], "counts": meta.get("Counts", {}), "profiles": prof,
            "files": [str(p) for p in need], "stats": meta.get("Stats", {}), "cached": True}


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


def run_segmentation(*, bids_dir, output_dir, participants, args, executor) -> dict:
    """Segment every selected participant and write the group tables and figures."""
    opts = seg_options(args)
    output_dir = Path(output_dir)
    atlas_path = find_atlas(bids_dir, getattr(args, "atlas", None))
    demo_atlas = Path(atlas_path).name == DEMO_ATLAS.name
    if opts["reach"] is None:
        opts["reach"] = DEMO_REACH if demo_atlas else DEFAULT_REACH
        if demo_atlas:
            log.info("demo atlas: --ot-reach defaults to %.0f mm (phantom scale)", DEMO_REACH)
    opts["reach"] = float(opts["reach"])
    atlas = load_atlas(atlas_path, max_per_bundle=opts["atlas_max"])   # fail early on a bad atlas
    jobs = find_tractograms(output_dir, participants, opts["track"], getattr(args, "session_label", None))
    log.info("bundle segmentation (%s) of %d participant run(s) with atlas %s (%d bundles)",
             opts["method"], len(jobs), atlas_path, len(atlas.names))
    calls = [((job, opts, str(atlas_path), str(output_dir)), {}) for job in jobs]
    results = []
    if executor is None:
        from tqdm import tqdm
        for args_, _ in tqdm(calls, desc="bundle segmentation", unit="participant", disable=None):
            results.append(segment_participant(*args_))
    else:
        from ..executor import run_tasks
        done = dict(run_tasks(executor, segment_participant, calls, desc="bundle segmentation"))
        results = [done[i] for i in range(len(calls))]

    gdir = outputs.group_dir(output_dir)
    prof = pd.concat([r["profiles"] for r in results], ignore_index=True)
    table = outputs.update_group_table(gdir / "tract_profiles.tsv", prof)
    scalars = [s for s in SCALARS if s in table.columns]
    from ...derivatives import write_json
    record = _params_record(opts, str(atlas_path), _atlas_space(atlas_path, opts["atlas_space"]))
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
    return {"participants": len(results), "atlas": str(atlas_path), "method": opts["method"],
            "counts": {run_label(r["entities"]): r["counts"] for r in results},
            "profiles": str(gdir / "tract_profiles.tsv"), "figures": figs,
            "reused": sum(bool(r.get("cached")) for r in results)}
