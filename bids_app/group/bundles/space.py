"""Moving a participant's streamlines from native space into the atlas space.

Modes (``--seg-transform``):

* ``tbss``: the TBSS group step's displacement field (:mod:`bids_app.group.transforms`);
  an error if it is missing.
* ``affine``: a label-free affine fit of the participant's tractogram onto the atlas
  (:mod:`.align`), from native space.
* ``auto``: the TBSS transform when one exists; then, unless its space is the atlas's
  own space, an affine refinement onto the atlas.  Without a TBSS transform: ``affine``.
* ``none``: the streamlines are already in the atlas space.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from nibabel.streamlines import ArraySequence

from ...config import SEG_TRANSFORMS
from ...derivatives import RUN_ENTITIES
from ...errors import NoInputError, UsageError
from .align import apply_affine, register_tractograms

log = logging.getLogger(__name__)

MODES = SEG_TRANSFORMS


@dataclass
class Mapping:
    """How the points were moved (for the sidecars)."""

    steps: list = field(default_factory=list)

    def describe(self) -> list:
        return list(self.steps)


def map_points(sl: ArraySequence, fn) -> ArraySequence:
    """Apply a point map ``(n, 3) -> (n, 3)`` to every point of an ``ArraySequence`` (a copy)."""
    out = sl.copy()
    if len(out):
        out._data = np.asarray(fn(np.asarray(out._data, np.float64)), dtype=np.float32)
    return out


def to_atlas_space(streamlines: ArraySequence, atlas, *, output_dir, entities: dict, mode: str = "auto",
                   atlas_space: str | None = None, max_fibres: int = 1000, seed: int = 0):
    """Return (streamlines in atlas space, :class:`Mapping`)."""
    if mode not in MODES:
        raise UsageError(f"--seg-transform must be one of {', '.join(MODES)}, not {mode!r}")
    mapping = Mapping()
    sl = streamlines
    if mode == "none":
        mapping.steps.append({"Type": "identity"})
        return sl, mapping
    xfm = None
    if mode in ("auto", "tbss"):
        xfm = _tbss_transform(output_dir, entities, atlas_space, required=(mode == "tbss"))
        if xfm is not None:
            sl = map_points(sl, xfm.points_to_common)
            mapping.steps.append({"Type": "displacement field", "Source": "TBSS group step",
                                  "Space": xfm.space})
    if mode == "affine" or (mode == "auto" and (xfm is None or atlas_space is None
                                                 or xfm.space != atlas_space)):
        T = register_tractograms(sl, atlas.fibres(), max_fibres=max_fibres, seed=seed)
        sl = map_points(sl, lambda p: apply_affine(T, p))
        mapping.steps.append({"Type": "affine", "Source": "tractogram-to-atlas fit (soft fibre matching)",
                              "Matrix": np.round(T, 6).tolist()})
    return sl, mapping


def _tbss_transform(output_dir, entities, atlas_space, required):
    from ..transforms import available_spaces, load_transform

    ents = {k: v for k, v in entities.items() if k in RUN_ENTITIES}
    spaces = available_spaces(output_dir, ents)
    if not spaces:
        if required:
            raise NoInputError(f"--seg-transform tbss: no TBSS transform for sub-{entities['sub']} in "
                               f"{output_dir}/group/tbss/xfm (run the TBSS group step first)")
        log.info("sub-%s: no TBSS transform; fitting an affine onto the atlas", entities["sub"])
        return None
    space = atlas_space if atlas_space in spaces else spaces[0]
    return load_transform(output_dir, ents, space)
