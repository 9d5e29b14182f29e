"""Find every participant's tensor maps (FA, MD, AD, RD) in the participant-level output."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ...derivatives import RUN_ENTITIES, TENSOR_SCALARS, parse_entities, run_label, subject_dir, tensor_map_path
from ...errors import NoInputError

log = logging.getLogger(__name__)

SCALARS = TENSOR_SCALARS
_FA_GLOBS = ("sub-*/dwi/*_model-tensor_param-fa_dwimap.nii.gz",
             "sub-*/ses-*/dwi/*_model-tensor_param-fa_dwimap.nii.gz")


@dataclass
class ParticipantMaps:
    entities: dict                      # short keys: sub, ses, acq, rec, dir, run
    paths: dict = field(default_factory=dict)   # scalar -> Path

    @property
    def label(self) -> str:
        return run_label(self.entities)

    @property
    def participant_id(self) -> str:
        return f"sub-{self.entities['sub']}"


def _readable(path: Path, shape=None) -> str | None:
    """None when the image loads as 3D finite data (of ``shape``), else the reason."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if data.ndim != 3:
        return f"not 3D (shape {data.shape})"
    if shape is not None and data.shape != tuple(shape):
        return f"shape {data.shape} differs from FA {tuple(shape)}"
    if not np.isfinite(data).any() or not np.any(data > 0):
        return "empty (no positive finite value)"
    return None


def _matches(ents: dict, selection: list[dict] | None) -> bool:
    if selection is None:
        return True
    return any(all(str(ents.get(k)) == str(v) for k, v in sel.items() if v not in (None, ""))
               for sel in selection)


def collect_maps(output_dir: Path | str, participants: list[dict] | None = None,
                 sessions: list[str] | None = None) -> tuple[list[ParticipantMaps], list[str], list[str]]:
    """Participants with a readable FA map and, if some participant has them, MD/AD/RD.

    Returns ``(found, scalars, problems)``.  A participant whose FA (or one of the extra
    maps that others have) is missing or unreadable is left out with a warning; a
    selected participant with no FA at all is reported too.
    """
    output_dir = Path(output_dir)
    problems: list[str] = []
    found: list[ParticipantMaps] = []
    seen = set()
    for pattern in _FA_GLOBS:
        for fa in sorted(output_dir.glob(pattern)):
            ents = parse_entities(fa.name)
            if "space" in ents or "sub" not in ents:
                continue  # not a native-space participant map
            ents = {k: ents[k] for k in RUN_ENTITIES if k in ents}
            if not _matches(ents, participants) or (sessions and ents.get("ses") not in sessions):
                continue
            key = tuple(sorted(ents.items()))
            if key in seen:
                continue
            seen.add(key)
            pm = ParticipantMaps(ents)
            base = subject_dir(output_dir, ents)
            for s in SCALARS:
                p = tensor_map_path(base, ents, s)
                if p.exists():
                    pm.paths[s] = p
            found.append(pm)

    if participants is not None:
        for sel in participants:
            if not any(_matches(p.entities, [sel]) for p in found):
                label = "_".join(f"{k}-{v}" for k, v in sel.items() if v)
                problems.append(f"{label}: no FA map (model-tensor_param-fa_dwimap) in {output_dir}; left out")

    kept = []
    for pm in found:
        why = _readable(pm.paths["fa"])
        if why:
            problems.append(f"{pm.label}: FA map {pm.paths['fa'].name} is {why}; left out")
            continue
        kept.append(pm)
    # the extra maps every participant should have (the participant level writes them together)
    scalars = ["fa"] + [s for s in SCALARS[1:] if any(s in pm.paths for pm in kept)]
    final = []
    for pm in kept:
        shape = nib.load(str(pm.paths["fa"])).shape[:3]
        bad = []
        for s in scalars[1:]:
            if s not in pm.paths:
                bad.append(f"{s.upper()} missing")
            else:
                why = _readable(pm.paths[s], shape)
                if why:
                    bad.append(f"{s.upper()} {why}")
        if bad:
            problems.append(f"{pm.label}: {'; '.join(bad)}; left out")
            continue
        final.append(pm)
    for msg in problems:
        log.warning(msg)
    if len(final) < 2:
        raise NoInputError(f"TBSS needs at least 2 participants with readable FA maps in {output_dir}; "
                           f"found {len(final)}" + (f" ({'; '.join(problems)})" if problems else ""))
    subs = [pm.entities["sub"] for pm in final]
    repeated = sorted({s for s in subs if subs.count(s) > 1})
    if repeated:
        log.warning("participants with several FA maps (sessions/runs), each treated as one observation: %s",
                    ", ".join(f"sub-{s}" for s in repeated))
    return final, scalars, problems
