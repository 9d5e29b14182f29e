"""File names and writers of the segmentation outputs (all writes are atomic).

Per participant, next to its tractogram in ``output_dir/sub-X[/ses-Y]/dwi/``
(``T`` = the tracking method of the input tractogram; streamlines stay in the
participant's native RAS+ mm, so no ``space-`` entity)::

    sub-X_track-T_desc-bundles_tractogram.trx     every labelled streamline, one group per bundle
    sub-X_tract-<Name>_track-T_tractogram.trx     one file per non-empty bundle (BEP046 tract-)
    sub-X_track-T_desc-counts_bundles.tsv         streamlines per bundle (+ outliers)
    sub-X_track-T_desc-profiles_bundles.tsv       tract profiles (subject, session, tract, node, fa...)

each with a JSON sidecar.  Group outputs in ``output_dir/group/bundles/``::

    tract_profiles.tsv, bundle_counts.tsv (+ .json)
    figures/tract-<Name>_profiles.png, figures/sub-X[_ses-Y]_bundles.png

``<Name>`` is the atlas bundle name with every non-alphanumeric character
removed (BIDS labels); the sidecars and tables keep the original name.
"""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ...derivatives import atomic_write, bids_name, shared_lock, sidecar_path, subject_dir, write_json

GROUP_DIR = ("group", "bundles")
PROFILE_COLUMNS = ("subject", "session", "tract", "node")


def tract_label(name: str) -> str:
    """A bundle name as a BIDS label (alphanumeric only)."""
    lab = re.sub(r"[^A-Za-z0-9]", "", str(name))
    if not lab:
        raise ValueError(f"bundle name {name!r} has no alphanumeric character")
    return lab


def group_dir(output_dir) -> Path:
    return Path(output_dir).joinpath(*GROUP_DIR)


def participant_paths(output_dir, entities: dict, track: str, names) -> dict:
    """Every per-participant output path."""
    d = subject_dir(output_dir, entities)
    e = {**entities, "track": track}
    return {
        "bundles": d / bids_name({**e, "desc": "bundles"}, "tractogram", ".trx"),
        "tracts": {n: d / bids_name({**e, "tract": tract_label(n)}, "tractogram", ".trx") for n in names},
        "counts": d / bids_name({**e, "desc": "counts"}, "bundles", ".tsv"),
        "profiles": d / bids_name({**e, "desc": "profiles"}, "bundles", ".tsv"),
    }


def write_trx(path: Path, streamlines, reference: nib.Nifti1Image, groups: dict | None = None,
              sidecar: dict | None = None, source_index: np.ndarray | None = None) -> Path:
    """Streamlines (RAS+ mm) as TRX, with optional groups ``{name: indices}``, and a sidecar.

    ``source_index`` (per streamline) is stored as the data-per-streamline ``source_index``:
    the streamline's index in the participant's whole-brain tractogram.
    """
    from nibabel.streamlines import Tractogram
    from trx.trx_file_memmap import TrxFile, save

    dps = {}
    dtypes = {"positions": np.float32, "offsets": np.uint32, "dpv": {}, "dps": {}}
    if source_index is not None:
        dps["source_index"] = np.asarray(source_index, np.uint32).reshape(-1, 1)
        dtypes["dps"]["source_index"] = np.uint32
    trx = TrxFile.from_tractogram(Tractogram(streamlines, data_per_streamline=dps, affine_to_rasmm=np.eye(4)),
                                  reference=reference, dtype_dict=dtypes)
    try:
        if groups:
            trx.groups = {k: np.asarray(v, dtype=np.uint32) for k, v in groups.items() if len(v)}
        with atomic_write(path) as tmp:
            save(trx, str(tmp))
    finally:
        trx.close()
    if sidecar is not None:
        write_json(sidecar_path(path), sidecar)
    return Path(path)


def write_tsv(path: Path, table: pd.DataFrame, sidecar: dict | None = None) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    if sidecar is not None:
        write_json(path.with_suffix(".json"), sidecar)
    return path


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False,
                       dtype={"subject": str, "session": str})


def profile_sidecar(scalars) -> dict:
    cols = {
        "subject": {"Description": "participant label (without 'sub-')"},
        "session": {"Description": "session label (without 'ses-'); n/a without sessions"},
        "tract": {"Description": "bundle name as in the atlas"},
        "node": {"Description": "node index along the bundle (0 = the end the atlas bundle's mean fibre "
                                "starts at, the same for every participant)"},
    }
    units = {"fa": "arbitrary", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s"}
    for s in scalars:
        cols[s] = {"Description": f"DTI {s.upper()} sampled trilinearly along the bundle, weighted mean "
                                  "over streamlines (weights 1/Mahalanobis distance of the node position)",
                   "Units": units.get(s, "arbitrary")}
    return cols


def update_group_table(path: Path, new: pd.DataFrame, keys=("subject", "session")) -> pd.DataFrame:
    """Replace the rows of the participants in ``new`` in the group table at ``path`` (file lock)."""
    with shared_lock(path):
        if path.exists():
            old = read_tsv(path)
            if len(new):
                done = set(map(tuple, new[list(keys)].fillna("").astype(str).values))
                mask = [tuple(r) not in done for r in old[list(keys)].fillna("").astype(str).values]
                old = old[mask]
            table = pd.concat([old, new], ignore_index=True) if len(old) else new
        else:
            table = new
        sort = [k for k in ("subject", "session", "tract", "node") if k in table.columns]
        table = table.sort_values(sort, kind="stable").reset_index(drop=True)
        write_tsv(path, table)
    return table
