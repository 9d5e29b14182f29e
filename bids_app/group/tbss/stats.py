"""Voxelwise GLM on the skeleton with permutation inference and TFCE.

* Design from ``participants.tsv``: a numeric column -> correlation (demeaned regressor),
  a two-level column -> two-sample t (indicator of the first level, alphabetical).
  Covariates: numeric ones demeaned, categorical ones dummy coded.  An intercept is
  always in the model.  Both signs of the effect are tested.
* Permutations follow Freedman & Lane: the residuals of the nuisance-only model are
  permuted (the first permutation is the identity), the full model refitted; this is
  exact permutation of the regressor when there are no covariates.
* TFCE (H=2, E=1, 26-connectivity on the skeleton, dh = max/100 of each map); the
  FWE-corrected p of a voxel is the fraction of permutations whose maximum TFCE
  reaches the voxel's observed TFCE.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputDataError, NoInputError, UsageError

log = logging.getLogger(__name__)


@dataclass
class Design:
    kind: str                      # "correlation" or "two-sample"
    column: str
    X: np.ndarray                  # (n, p): regressor of interest first, then intercept, covariates
    names: list
    rows: list                     # indices (into the participant list) used in the model
    contrasts: list = field(default_factory=list)   # [(label, sign)] sign +1/-1 on column 0
    levels: list = field(default_factory=list)
    dropped: list = field(default_factory=list)     # messages


def _alnum(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", str(s))


def read_participants_tsv(bids_dir: Path | str):
    import pandas as pd
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        raise NoInputError(f"--stats-column needs {path}, which does not exist")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a", "N/A", "NA", ""],
                         keep_default_na=False)
    except Exception as exc:
        raise NoInputError(f"cannot read {path}: {exc}") from None
    if "participant_id" not in df.columns:
        raise UsageError(f"{path} has no participant_id column")
    df["participant_id"] = [p if str(p).startswith("sub-") else f"sub-{p}" for p in df["participant_id"]]
    return df.drop_duplicates("participant_id").set_index("participant_id")


def _numeric(values) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        return None


def check_columns(bids_dir: Path | str, column: str, covariates=None):
    """participants.tsv, once its stats column and covariates are known to be there."""
    df = read_participants_tsv(bids_dir)
    covariates = list(covariates or [])
    for col in [column] + covariates:
        if col not in df.columns:
            raise UsageError(f"column {col!r} is not in participants.tsv (columns: "
                             f"{', '.join(c for c in df.columns)})")
    if column in covariates:
        raise UsageError(f"{column!r} is both the stats column and a covariate")
    return df


def build_design(bids_dir: Path | str, participant_ids: list[str], column: str,
                 covariates: list[str] | None = None) -> Design:
    """Design matrix for the participants (``sub-XX`` ids, one per observation)."""
    df = check_columns(bids_dir, column, covariates)
    covariates = list(covariates or [])
    rows, dropped = [], []
    for i, pid in enumerate(participant_ids):
        if pid not in df.index:
            dropped.append(f"{pid}: not in participants.tsv; left out of the statistics")
            continue
        vals = df.loc[pid, [column] + covariates]
        if vals.isna().any():
            missing = [c for c in vals.index if vals.isna()[c]]
            dropped.append(f"{pid}: no value for {', '.join(missing)}; left out of the statistics")
            continue
        rows.append(i)
    for msg in dropped:
        log.warning(msg)
    ids = [participant_ids[i] for i in rows]
    raw = df.loc[ids, column].tolist()
    num = _numeric(raw)
    if num is not None:
        if len(np.unique(num)) < 2:
            raise UsageError(f"column {column!r} has a single value among the participants used; "
                             "nothing to test")
        kind, levels = "correlation", []
        x = num - num.mean()
        lab = _alnum(column) or "effect"
        contrasts = [(f"{lab}Positive", 1.0), (f"{lab}Negative", -1.0)]
    else:
        levels = sorted(set(raw))
        if len(levels) < 2:
            raise UsageError(f"column {column!r} has one level ({levels[0]!r}) among the participants used; "
                             "a two-sample test needs two")
        if len(levels) > 2:
            raise UsageError(f"column {column!r} is not numeric and has {len(levels)} levels "
                             f"({', '.join(levels)}); use a numeric column (correlation) or a two-level one")
        kind = "two-sample"
        x = np.array([1.0 if v == levels[0] else 0.0 for v in raw])
        a, b = _alnum(levels[0]) or "A", _alnum(levels[1]) or "B"
        contrasts = [(f"{a}GT{b}", 1.0), (f"{b}GT{a}", -1.0)]
    cols, names = [x, np.ones(len(ids))], [column, "intercept"]
    for cov in covariates:
        cv = df.loc[ids, cov].tolist()
        cn = _numeric(cv)
        if cn is not None:
            cols.append(cn - cn.mean())
            names.append(cov)
        else:
            lv = sorted(set(cv))
            for level in lv[1:]:
                d = np.array([1.0 if v == level else 0.0 for v in cv])
                cols.append(d - d.mean())
                names.append(f"{cov}[{level}]")
    X = np.stack(cols, axis=1)
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise UsageError(f"the design ({', '.join(names)}) is rank deficient: a covariate duplicates "
                         "another column")
    if len(ids) - X.shape[1] < 1:
        raise InputDataError(f"{len(ids)} participants with values are too few for a model with "
                             f"{X.shape[1]} columns")
    return Design(kind, column, X, names, rows, contrasts, levels, dropped)


# ----------------------------------------------------------------------------------------------
# permutation GLM

@dataclass
class PermutationResult:
    t: np.ndarray                  # (V,) observed t of the regressor of interest
    tfce: dict                     # sign -> (V,) observed TFCE of sign * t
    p_fwe: dict                    # sign -> (V,) FWE-corrected p
    max_null: dict                 # sign -> (B,) max TFCE per permutation (first: identity)
    n_permutations: int
    dof: int


def _t_batch(perm_idx, a, Q, Rz, rz_ss, scale):
    """t of the permuted data for a batch of permutations (B, n) -> (B, V)."""
    A = a[perm_idx]                                  # (B, n)
    num = A @ Rz                                     # (B, V)
    B, n = perm_idx.shape
    p = Q.shape[1]
    Qp = Q[perm_idx].transpose(0, 2, 1).reshape(B * p, n)
    proj = (Qp @ Rz).reshape(B, p, -1)
    rss = np.maximum(rz_ss[None, :] - np.sum(proj ** 2, axis=1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / np.sqrt(rss * scale)
    t[~np.isfinite(t)] = 0.0
    return t


def permutation_glm(Y: np.ndarray, X: np.ndarray, indptr: np.ndarray, indices: np.ndarray, *,
                    n_permutations: int = 5000, seed: int = 0, H: float = 2.0, E: float = 1.0,
                    progress: bool | None = None) -> PermutationResult:
    """t-test of column 0 of ``X`` on every column of ``Y`` (n, V), TFCE on the graph, FWE p."""
    from tqdm import tqdm

    from kernels.tfce import max_tfce_batch, tfce_graph

    Y = np.asarray(Y, np.float64)
    X = np.asarray(X, np.float64)
    n, V = Y.shape
    Z = X[:, 1:]
    Rz = Y - Z @ np.linalg.lstsq(Z, Y, rcond=None)[0]
    Q, _ = np.linalg.qr(X)
    xtx_inv = np.linalg.inv(X.T @ X)
    c = np.zeros(X.shape[1])
    c[0] = 1.0
    a = X @ xtx_inv @ c
    dof = n - np.linalg.matrix_rank(X)
    scale = float(c @ xtx_inv @ c) / dof
    rz_ss = np.sum(Rz ** 2, axis=0)

    rng = np.random.default_rng(seed)
    n_perm = max(int(n_permutations), 1)
    batch = int(max(1, min(256, 2e7 // max(V * X.shape[1], 1))))
    t_obs = _t_batch(np.arange(n)[None], a, Q, Rz, rz_ss, scale)[0]
    tf_obs = {s: tfce_graph(s * t_obs, indptr, indices, 0.0, H, E) for s in (1.0, -1.0)}
    max_null = {1.0: np.empty(n_perm), -1.0: np.empty(n_perm)}
    done = 0
    with tqdm(total=n_perm, desc="permutations", unit="perm", disable=progress) as bar:
        while done < n_perm:
            b = min(batch, n_perm - done)
            idx = np.stack([rng.permutation(n) for _ in range(b)])
            if done == 0:
                idx[0] = np.arange(n)
            t = _t_batch(idx, a, Q, Rz, rz_ss, scale)
            for s in (1.0, -1.0):
                max_null[s][done:done + b] = max_tfce_batch(np.ascontiguousarray(s * t), indptr, indices, H, E)
            done += b
            bar.update(b)
    p = {}
    for s in (1.0, -1.0):
        obs = tf_obs[s]
        srt = np.sort(max_null[s])
        # number of permutation maxima >= observed value
        count = n_perm - np.searchsorted(srt, obs * (1 - 1e-12), side="left")
        p[s] = np.where(obs > 0, count / n_perm, 1.0)
    return PermutationResult(t_obs, tf_obs, p, max_null, n_perm, int(dof))


def clusters_table(p: np.ndarray, t: np.ndarray, tfce: np.ndarray, voxels: np.ndarray,
                   affine: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                   alpha: float = 0.05) -> list[dict]:
    """Connected (26) groups of skeleton voxels with p < alpha, largest first, with their peaks."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    sig = np.flatnonzero(p < alpha)
    if sig.size == 0:
        return []
    n = len(p)
    g = csr_matrix((np.ones(len(indices)), indices, indptr), shape=(n, n))[sig][:, sig]
    ncomp, lab = connected_components(g, directed=False)
    rows = []
    for k in range(ncomp):
        members = sig[lab == k]
        peak = members[np.argmax(tfce[members])]
        ijk = voxels[peak]
        xyz = affine[:3, :3] @ ijk + affine[:3, 3]
        rows.append({"n_voxels": int(len(members)), "min_p_fwe": float(p[members].min()),
                     "peak_tfce": float(tfce[peak]), "peak_t": float(t[peak]),
                     "peak_i": int(ijk[0]), "peak_j": int(ijk[1]), "peak_k": int(ijk[2]),
                     "peak_x": round(float(xyz[0]), 2), "peak_y": round(float(xyz[1]), 2),
                     "peak_z": round(float(xyz[2]), 2)})
    rows.sort(key=lambda r: (-r["n_voxels"], r["min_p_fwe"]))
    for i, r in enumerate(rows, 1):
        r["cluster"] = i
    return rows
