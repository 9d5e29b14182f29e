"""The registration target: a participant chosen automatically, a TemplateFlow template, or an image.

``auto`` makes TBSS's all-to-all (``-n``) idea cheap: every participant is registered to
every other at a coarse resolution, each candidate target ``f`` is scored by the mean over
``g != f`` of the mean squared non-linear displacement of ``g -> f``, and the lowest score
wins; then everyone is registered to it at full resolution (N^2 coarse + N fine
registrations instead of N^2 fine).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ...derivatives import atomic_write, bids_name, shared_lock, write_json
from ...errors import NoInputError, UsageError
from ...stages import Stage
from ..executor import run_tasks
from .collect import ParticipantMaps
from .register import RegistrationSettings, pair_scores_task

log = logging.getLogger(__name__)

STUDY_SPACE = "tbss"   # space label of a study-specific target (a participant or a given image)


@dataclass
class Target:
    kind: str                       # "participant", "image" or "template"
    spec: dict                      # registration input {"path", "kind"}
    label: str                      # participant label, template name or file name
    space: str                      # space label of the target's grid
    index: int | None = None        # participant index when kind == "participant"
    scores: np.ndarray | None = None

    def describe(self) -> dict:
        d = {"Type": self.kind, "Label": self.label, "Image": str(self.spec["path"]), "Space": self.space}
        return d


# ----------------------------------------------------------------------------------------------
# TemplateFlow, offline

def templateflow_home() -> Path:
    return Path(os.environ.get("TEMPLATEFLOW_HOME", str(Path.home() / ".cache" / "templateflow")))


def templateflow_image(name: str, voxel_size: float | None = None, *, suffix: str = "probseg",
                       label: str | None = "WM") -> Path:
    """A template image from the local TemplateFlow home (never downloads).

    Picks ``tpl-<name>[_res-XX]_label-WM_probseg.nii.gz`` (an FA-like target) with the
    resolution closest to ``voxel_size``.
    """
    home = templateflow_home()
    tdir = home / f"tpl-{name}"
    if not (tdir / "template_description.json").exists():
        have = sorted(p.name[4:] for p in home.glob("tpl-*") if p.is_dir()) if home.is_dir() else []
        raise UsageError(f"TemplateFlow template {name!r} is not available offline in {home} "
                         f"(TEMPLATEFLOW_HOME); available: {', '.join(have) or 'none'}")
    pattern = f"tpl-{name}*" + (f"_label-{label}" if label else "") + f"_{suffix}.nii*"
    cands = [p for p in sorted(tdir.rglob(pattern))
             if "_desc-" not in p.name and "_atlas-" not in p.name and p.stat().st_size > 0]
    if not cands:
        raise UsageError(f"TemplateFlow template {name!r} has no {pattern} image fetched in {tdir} "
                         "(files must be downloaded when the image is built; we never download)")
    if voxel_size is None or len(cands) == 1:
        return cands[0]
    sizes = [float(np.mean(nib.load(str(p)).header.get_zooms()[:3])) for p in cands]
    best = int(np.argmin([abs(s - voxel_size) + 1e-6 * s for s in sizes]))
    return cands[best]


# ----------------------------------------------------------------------------------------------
# all-to-all scoring

def _pair_label(pm: ParticipantMaps) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", pm.label)


def all_to_all_scores(participants: list[ParticipantMaps], executor, *, st: RegistrationSettings,
                      out_dir: Path, stage: str, disable_progress: bool | None = None) -> np.ndarray:
    """``scores[f, g]``: mean squared non-linear displacement (mm^2) of ``g`` registered to ``f``.

    One task per unordered pair (both directions, see ``pair_scores_task``), each a stage of the
    stage runner: its JSON under ``out_dir/<stage>/`` is reused on a rerun while both FA maps and
    the settings are unchanged.
    """
    n = len(participants)
    scores = np.full((n, n), np.nan)
    np.fill_diagonal(scores, 0.0)
    calls, where = [], []
    for f in range(n):
        for g in range(f + 1, n):
            pf, pg = participants[f], participants[g]
            key = f"pair-{_pair_label(pf)}x{_pair_label(pg)}"
            pair = Stage(key, outputs=(out_dir / stage / f"{key}_score.json",), files=(pf.paths["fa"], pg.paths["fa"]),
                         params={"Settings": st.as_dict()})
            if pair.is_complete():
                cached = _read_json(pair.outputs[0])
                scores[f, g], scores[g, f] = cached["ScoreSecondToFirst"], cached["ScoreFirstToSecond"]
                continue
            meta = {"First": str(pf.paths["fa"]), "Second": str(pg.paths["fa"]), "Settings": st.as_dict()}
            calls.append((({"path": str(pf.paths["fa"]), "kind": "fa"}, {"path": str(pg.paths["fa"]), "kind": "fa"},
                           st.as_dict(), str(pair.outputs[0]), meta), {"stage": pair}))
            where.append((f, g))
    if calls:
        log.info("%s all-to-all: %d pair tasks to run (%d reused)", stage, len(calls),
                 n * (n - 1) // 2 - len(calls))
    cpu = 0.0
    for i, res in run_tasks(executor, pair_scores_task, calls, desc=f"{stage} all-to-all",
                            disable_progress=disable_progress):
        f, g = where[i]
        scores[f, g], scores[g, f] = res["ScoreSecondToFirst"], res["ScoreFirstToSecond"]
        cpu += res.get("CPUSeconds", 0.0)
    if calls:
        log.info("%s all-to-all: %.1f CPU seconds in registrations", stage, cpu)
    return scores


def choose_from_scores(scores: np.ndarray) -> int:
    """Index of the participant with the lowest mean score as the target."""
    n = scores.shape[0]
    mean = (np.nansum(scores, axis=1)) / max(n - 1, 1)
    return int(np.argmin(mean))


def _read_json(path: Path) -> dict:
    import json
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_scores_table(path: Path, participants: list[ParticipantMaps], scores: np.ndarray, chosen: int,
                       sidecar: dict) -> Path:
    labels = [pm.label for pm in participants]
    n = len(labels)
    mean = np.nansum(scores, axis=1) / max(n - 1, 1)
    lines = ["target\t" + "\t".join(labels) + "\tmean_score\tchosen"]
    for f in range(n):
        vals = "\t".join("n/a" if f == g else f"{scores[f, g]:.6g}" for g in range(n))
        lines.append(f"{labels[f]}\t{vals}\t{mean[f]:.6g}\t{int(f == chosen)}")
    with shared_lock(path):
        with atomic_write(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        write_json(path.with_suffix(".json"), sidecar)
    return path


def select_auto(participants: list[ParticipantMaps], executor, *, out_dir: Path, quick: bool = False,
                full: bool = False, disable_progress: bool | None = None) -> Target:
    """Coarse (default) or full-resolution all-to-all target selection."""
    from .register import settings
    stage = "full" if full else "coarse"
    st = settings(stage, quick)
    scores = all_to_all_scores(participants, executor, st=st, out_dir=out_dir, stage=stage,
                               disable_progress=disable_progress)
    f = choose_from_scores(scores)
    pm = participants[f]
    table = out_dir / bids_name({"desc": f"targetscores{stage}"}, "table", ".tsv")
    write_scores_table(table, participants, scores, f, {
        "Description": f"TBSS target selection ({stage} all-to-all): entry [row f, column g] is the mean "
                       "squared non-linear displacement (mm^2) of g registered to f over f's brain; the "
                       "target is the row with the lowest mean.",
        "Chosen": pm.label, "Settings": st.as_dict()})
    log.info("TBSS target (%s all-to-all): %s", stage, pm.label)
    return Target("participant", {"path": str(pm.paths["fa"]), "kind": "fa"}, pm.label, STUDY_SPACE, f, scores)


def target_kind(value: str) -> str:
    """``auto``, ``image`` or ``template``, once the value is known to be usable (no registration
    is run: fast enough for the checks before any work)."""
    value = (value or "auto").strip()
    if value == "auto":
        return "auto"
    path = Path(value)
    if path.suffix in (".nii", ".gz") or os.sep in value or path.exists():
        if not path.is_file():
            raise NoInputError(f"--tbss-target {value}: no such file")
        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise UsageError(f"--tbss-target {value} is not a readable NIfTI image: {exc}") from None
        if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
            raise UsageError(f"--tbss-target {value} is not a 3D image (shape {img.shape})")
        return "image"
    if not re.fullmatch(r"[A-Za-z0-9]+", value):
        raise UsageError(f"--tbss-target {value!r} is neither 'auto', a TemplateFlow name nor an existing file")
    templateflow_image(value)
    return "template"


def resolve_target(value: str, participants: list[ParticipantMaps], executor, *, out_dir: Path,
                   quick: bool = False, disable_progress: bool | None = None) -> Target:
    """``auto`` | a TemplateFlow template name | a path to an FA image."""
    value = (value or "auto").strip()
    kind = target_kind(value)
    if kind == "auto":
        return select_auto(participants, executor, out_dir=out_dir, quick=quick,
                           disable_progress=disable_progress)
    if kind == "image":
        path = Path(value)
        return Target("image", {"path": str(path.resolve()), "kind": "fa"}, path.name, STUDY_SPACE)
    tpl = templateflow_image(value, median_voxel_size(participants))
    return Target("template", {"path": str(tpl), "kind": "template"}, value, value)


def median_voxel_size(participants: list[ParticipantMaps]) -> float:
    sizes = [float(np.mean(nib.load(str(pm.paths["fa"])).header.get_zooms()[:3])) for pm in participants]
    return float(np.median(sizes))
