"""Bundle atlases: labelled fibres in the common space (a TRX whose groups are bundle names)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputDataError, NoInputError
from .fibres import N_POINTS, arc_lengths, as_sequence, mean_fibre, resample, to_vectors

log = logging.getLogger(__name__)

# (fraction of the fibre length, number of windows) of the fragments added to the atlas
FRAGMENT_WINDOWS = ((0.75, 2), (0.5, 3), (0.3, 4))

DEMO_ATLAS = Path("sourcedata") / "groundtruth" / "template" / "tpl-phantom_tractogram.trx"


@dataclass
class Atlas:
    """Resampled atlas fibres (``points`` (m, npts, 3) mm) with a bundle index per fibre.

    ``windows`` (m, w, npts, 3), when set by :meth:`with_fragments`: each fibre and sub-fibres
    of it (window 0 is the whole fibre); the transport cost to an atlas fibre is then the best
    of its windows, so a partial streamline matches the part of the atlas fibre it covers.
    """

    names: list
    points: np.ndarray
    labels: np.ndarray
    source: str = ""
    windows: np.ndarray | None = None
    _centroids: np.ndarray | None = field(default=None, repr=False)

    @property
    def npts(self) -> int:
        return self.points.shape[1]

    def vectors(self) -> np.ndarray:
        """Whole fibres as vectors (m, 3 * npts)."""
        return to_vectors(self.points)

    def window_vectors(self) -> np.ndarray:
        """(m, w, 3 * npts): every fibre's windows as vectors (w = 1 without fragments)."""
        if self.windows is None:
            return self.vectors()[:, None, :]
        m, w = self.windows.shape[:2]
        return to_vectors(self.windows.reshape(m * w, self.npts, 3)).reshape(m, w, 3 * self.npts)

    def fibres(self) -> np.ndarray:
        """The whole atlas fibres, (m, npts, 3)."""
        return self.points

    def counts(self) -> dict:
        c = np.bincount(self.labels, minlength=len(self.names))
        return {n: int(c[k]) for k, n in enumerate(self.names)}

    def centroids(self) -> np.ndarray:
        """(n_bundles, npts, 3): each bundle's consistently oriented mean fibre.

        The orientation fixes node 0 of every tract profile (same end for every subject).
        """
        if self._centroids is None:
            out = np.full((len(self.names), self.npts, 3), np.nan)
            for k in range(len(self.names)):
                sel = self.labels == k
                if sel.any():
                    out[k], _ = mean_fibre(self.points[sel])
            self._centroids = out
        return self._centroids

    def with_fragments(self, windows=FRAGMENT_WINDOWS) -> "Atlas":
        """A copy whose fibres carry windows: the whole fibre and sub-fibres of it.

        ``windows``: ``(fraction of the length, number of windows)`` pairs; the windows of one
        fraction are spread evenly from one end of the fibre to the other.  Tracked streamlines
        are often pieces of a bundle: a sub-fibre of about the same extent is close to them in
        the RMS fibre distance where the whole atlas fibre is not.  Every atlas fibre keeps its
        own (uniform) mass: the windows change the cost, not the measure.
        """
        if not windows or len(self.points) == 0:
            return self
        dense = resample(self.points, 101)
        u = np.linspace(0.0, 1.0, self.npts)
        wins = [self.points]
        for frac, count in windows:
            for start in np.linspace(0.0, 1.0 - frac, int(count)):
                t = (start + frac * u) * 100.0
                i0 = np.clip(np.floor(t).astype(int), 0, 99)
                w = (t - i0)[None, :, None]
                wins.append(dense[:, i0] * (1 - w) + dense[:, i0 + 1] * w)
        return Atlas(list(self.names), self.points, self.labels, self.source, np.stack(wins, axis=1))

    @staticmethod
    def from_streamlines(bundles: dict, npts: int = N_POINTS, source: str = "") -> "Atlas":
        """From ``{name: [(k, 3) arrays in mm]}``."""
        names, pts, labels = [], [], []
        for name, sl in bundles.items():
            sl = as_sequence(sl)
            if len(sl) == 0:
                continue
            sl = sl[np.flatnonzero(arc_lengths(sl) > 0)]
            if len(sl) == 0:
                continue
            names.append(str(name))
            pts.append(resample(sl, npts))
            labels.append(np.full(len(sl), len(names) - 1, np.int64))
        if not names:
            raise InputDataError(f"atlas {source or ''} has no usable streamlines".replace("  ", " "))
        return Atlas(names, np.concatenate(pts), np.concatenate(labels), source)


def load_atlas(path: Path | str, npts: int = N_POINTS, max_per_bundle: int | None = None,
               seed: int = 0) -> Atlas:
    """Read a TRX atlas: one group per bundle (group name = bundle name).

    ``max_per_bundle`` keeps a random subset of each bundle (fast runs on big atlases).
    """
    from ...trx_reader import open_trx

    path = Path(path)
    if not path.exists():
        raise NoInputError(f"atlas {path} does not exist")
    rng = np.random.default_rng(seed)
    bundles = {}
    try:
        with open_trx(path) as trx:
            for name in sorted(trx.groups):
                idx = np.asarray(trx.groups[name], dtype=np.int64)
                if max_per_bundle and len(idx) > max_per_bundle:
                    idx = np.sort(rng.choice(idx, max_per_bundle, replace=False))
                bundles[name] = trx.streamlines[idx].copy()
    except Exception as exc:  # trx raises assorted errors on a bad file
        raise InputDataError(f"cannot read atlas {path} as TRX: {exc}") from None
    if not bundles:
        raise InputDataError(f"atlas {path} has no groups: its groups must be the bundle labels")
    atlas = Atlas.from_streamlines(bundles, npts, source=str(path))
    log.info("atlas %s: %s", path, atlas.counts())
    return atlas


def atlas_problem(path: Path | str) -> str | None:
    """Why ``path`` cannot be a bundle atlas (a TRX whose groups are bundles), or None; reads only
    the archive's table of contents, so it is instant even on a large atlas."""
    import zipfile
    path = Path(path)
    if not path.exists():
        return "no such file"
    if path.is_dir():                                   # an unpacked TRX
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"is not a TRX file ({exc})"
    if "header.json" not in names:
        return "is not a TRX file (no header.json)"
    if not any(n.startswith("groups/") and not n.endswith("/") for n in names):
        return "has no groups: its groups must be the bundle labels"
    return None


def find_atlas(bids_dir: Path | str, atlas: Path | str | None) -> Path:
    """``--atlas`` if given, else the demo dataset's own atlas; NoInputError otherwise."""
    if atlas:
        p = Path(atlas)
        if not p.is_file():
            raise NoInputError(f"--atlas {p} does not exist")
        return p
    demo = Path(bids_dir) / DEMO_ATLAS
    if demo.is_file():
        return demo
    raise NoInputError("bundle segmentation needs an atlas: pass --atlas PATH (a TRX whose groups are "
                       "bundle labels, in the group's common space)")
