"""Find each selected participant's DWI runs with pybids.

One :class:`DwiInput` per DWI run: the image, its bval/bvec (found through the
BIDS inheritance principle), merged JSON sidecar metadata, an optional brain
mask and T1w.  With ``--input-derivatives`` (e.g. QSIPrep) the preprocessed
``desc-preproc_dwi`` is preferred over the raw run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .derivatives import LONG_TO_SHORT
from .errors import InputDataError, NoInputError, NoMatchError, OutputError, UsageError, describe_os_error

log = logging.getLogger(__name__)

# datatypes we never read: ignoring them keeps indexing fast on large datasets
_IGNORED_DATATYPES = ("func", "perf", "beh", "eeg", "meg", "ieeg", "pet", "micr", "nirs", "motion", "fmap")
_FILTER_KEYS_ALLOWED = {"acquisition", "reconstruction", "direction", "run", "session", "space", "desc",
                        "extension", "suffix", "datatype"}


@dataclass
class DwiInput:
    """One DWI run to process."""

    dwi: Path
    bval: Path
    bvec: Path
    entities: dict  # short keys: sub, ses, acq, rec, dir, run
    metadata: dict = field(default_factory=dict)
    mask: Path | None = None
    t1w: Path | None = None
    source: str = "raw"  # "raw" or "derivatives"

    @property
    def label(self) -> str:
        return "_".join(f"{k}-{v}" for k, v in self.entities.items() if v not in (None, ""))


def load_filter_file(path: Path | None) -> dict:
    """Read ``--bids-filter-file``; return the entity filters for the 'dwi' query."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"--bids-filter-file {path} does not exist")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("dwi", {}), dict):
        raise UsageError(f'--bids-filter-file {path} must look like {{"dwi": {{"acquisition": "..."}}}}')
    filters = dict(spec.get("dwi", {}))
    bad = set(filters) - _FILTER_KEYS_ALLOWED
    if bad:
        raise UsageError(f"--bids-filter-file: unsupported entities {sorted(bad)}; "
                         f"allowed: {sorted(_FILTER_KEYS_ALLOWED)}")
    return filters


def _indexer(subjects: list[str] | None = None):
    from bids import BIDSLayoutIndexer

    ignore = [re.compile(rf"^/sub-[^/]+/(ses-[^/]+/)?({'|'.join(_IGNORED_DATATYPES)})/"),
              re.compile(r"^/(code|sourcedata|stimuli|derivatives|logs|work|group)/"),
              re.compile(r"/\.")]
    if subjects:
        alt = "|".join(re.escape(s) for s in subjects)
        ignore.append(re.compile(rf"^/sub-(?!({alt})(/|$))"))
    return BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=True)


def _layout(root: Path, database_dir: Path | None, subjects: list[str] | None, derivatives=False):
    """A layout indexing only ``subjects`` (all if None), in memory or in a private ``database_dir``."""
    from bids import BIDSLayout

    kwargs = dict(validate=False, indexer=_indexer(subjects), is_derivative=derivatives)
    if derivatives:
        kwargs["config"] = ["bids", "derivatives"]
    if database_dir is not None:
        Path(database_dir).mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(database_dir)
    try:
        return BIDSLayout(str(root), **kwargs)
    except (ValueError, OSError) as exc:
        raise NoInputError(f"cannot read {root} as a BIDS dataset: {exc}") from None


# A shared --bids-database-dir holds pybids' index of the whole dataset (queries select the
# subjects); a table of the same SQLite file says which dataset, which subject folders and which
# indexing rules it was built from: index and description are replaced together, in one rename.
_DB_FILE = "layout_index.sqlite"
_MARKER_TABLE = "tractoscale_index"
_INDEX_RULES = 1      # bump when _indexer's rules change: shared indexes are rebuilt


def shared_layout(root: Path, database_dir: Path):
    """The layout of the whole dataset from the shared index in ``database_dir``.

    The index is built once, under a file lock, into a private folder and moved into place, so
    many array tasks may start at once: one builds it, the others wait and load it.  It is rebuilt
    when the dataset's subject folders change; a folder holding another dataset's or another
    program's index is a usage error.
    """
    from bids import BIDSLayout

    database_dir = Path(database_dir)
    want = {"Root": str(Path(root).resolve()), "Subjects": list_subjects(root), "IndexRules": _INDEX_RULES}
    try:
        database_dir.mkdir(parents=True, exist_ok=True)
        with _index_lock(database_dir) as writable:
            if _index_state(database_dir, want) != "current":
                if not writable:
                    raise OutputError(f"--bids-database-dir {database_dir}: the index must be (re)built but "
                                      "the folder cannot be written")
                _build_index(root, database_dir, want)
        return BIDSLayout(want["Root"], database_path=str(database_dir), validate=False)
    except OSError as exc:     # the database folder (exit 73) or the dataset (74) cannot be used
        raise describe_os_error(exc, database_dir) from None
    except ValueError as exc:
        raise NoInputError(f"cannot read {root} as a BIDS dataset: {exc}") from None


@contextlib.contextmanager
def _index_lock(database_dir: Path):
    """Hold the index's file lock; yields False (no lock) when the folder is read-only: a current
    index there is still usable."""
    from filelock import FileLock
    lock = FileLock(str(database_dir / f".{_DB_FILE}.lock"))
    try:
        lock.acquire()
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def read_index_marker(database_dir: Path) -> dict | None:
    """What a shared index was built from (see :func:`shared_layout`); None if tractoscale did not
    build it."""
    import sqlite3
    try:
        con = sqlite3.connect(f"file:{Path(database_dir) / _DB_FILE}?mode=ro", uri=True)
        try:
            (text,) = con.execute(f"SELECT marker FROM {_MARKER_TABLE}").fetchone()
        finally:
            con.close()
        return json.loads(text)
    except (sqlite3.Error, TypeError, ValueError):
        return None


def _index_state(database_dir: Path, want: dict) -> str:
    """'missing', 'current' or 'stale'; raises UsageError for an index that is not ours to rebuild."""
    if not (database_dir / _DB_FILE).exists():
        return "missing"
    have = read_index_marker(database_dir)
    if have is None:
        raise UsageError(f"--bids-database-dir {database_dir} holds a pybids index that tractoscale did not "
                         "make (it may leave out DWI files); give tractoscale its own folder")
    if have.get("Root") != want["Root"]:
        raise UsageError(f"--bids-database-dir {database_dir} indexes {have.get('Root')}, not {want['Root']}")
    if have == want:
        return "current"
    log.info("the shared index in %s is out of date (subject folders or indexing rules changed): "
             "indexing %s again", database_dir, want["Root"])
    return "stale"


def _build_index(root: Path, database_dir: Path, want: dict) -> None:
    import shutil
    import sqlite3
    import tempfile

    from bids import BIDSLayout

    log.info("indexing %s into the shared pybids database %s", root, database_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=database_dir))
    try:
        layout = BIDSLayout(want["Root"], database_path=str(tmp), validate=False, indexer=_indexer())
        layout.connection_manager.session.close()
        layout.connection_manager.engine.dispose()
        con = sqlite3.connect(tmp / _DB_FILE)
        try:
            with con:
                con.execute(f"CREATE TABLE {_MARKER_TABLE} (marker TEXT)")
                con.execute(f"INSERT INTO {_MARKER_TABLE} VALUES (?)", (json.dumps(want),))
        finally:
            con.close()
        os.replace(tmp / _DB_FILE, database_dir / _DB_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entities(f) -> dict:
    ents = f.get_entities()
    out = {}
    for long, short in LONG_TO_SHORT.items():
        if long in ents:
            val = ents[long]
            out[short] = f"{val:02d}" if short == "run" and isinstance(val, int) and _zero_padded(f, val) \
                else str(val)
    return out


def _zero_padded(f, val) -> bool:
    m = re.search(r"_run-(\d+)", Path(f.path).name)
    return bool(m) and m.group(1) != str(val)


def _run_label(f) -> str | None:
    m = re.search(r"_run-(\d+)", Path(f.path).name)
    return m.group(1) if m else None


def list_subjects(bids_dir: Path) -> list[str]:
    """Subject labels from the folder names (cheap; no indexing)."""
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def select_subjects(bids_dir: Path, labels: list[str] | None) -> list[str]:
    available = list_subjects(bids_dir)
    if not available:
        raise NoInputError(f"no sub-* folders in {bids_dir}: is this a BIDS dataset?")
    if not labels:
        return available
    unknown = [lab for lab in labels if lab not in available]
    if unknown:
        raise UsageError(f"unknown participant label(s): {', '.join(unknown)} "
                         f"(available: {', '.join(available[:20])}{' ...' if len(available) > 20 else ''})")
    return list(dict.fromkeys(labels))


def discover(bids_dir: Path, subjects: list[str], *, sessions: list[str] | None = None,
             filters: dict | None = None, derivatives_dir: Path | None = None,
             database_dir: Path | None = None, shared_database: bool = False,
             strict: bool = True) -> list[DwiInput]:
    """Every DWI run of the selected subjects/sessions, raw or preprocessed.

    ``database_dir``: where pybids keeps its index: a private one of the selected subjects, or with
    ``shared_database`` (``--bids-database-dir``) one of the whole dataset that concurrent runs
    share (:func:`shared_layout`).  ``strict``: a selected subject without DWI is an error;
    otherwise it is skipped with a warning (an error only when no subject has any DWI).
    """
    filters = dict(filters or {})
    if "desc" in filters and derivatives_dir is None:
        raise UsageError('--bids-filter-file: "desc" selects preprocessed files, which only '
                         "--input-derivatives provides (raw DWI have no desc entity)")
    if shared_database and database_dir is not None:
        layout = shared_layout(bids_dir, database_dir)
    else:
        layout = _layout(bids_dir, database_dir, subjects)
    if sessions:
        known = set(layout.get_sessions(subject=subjects))
        unknown = [s for s in sessions if s not in known]
        if unknown:
            raise NoMatchError(f"unknown session label(s): {', '.join(unknown)} "
                               f"(available: {', '.join(sorted(known)) or 'none'})")
    deriv_layout = None
    if derivatives_dir is not None:
        if not Path(derivatives_dir).is_dir():
            raise NoInputError(f"--input-derivatives {derivatives_dir} does not exist")
        if not (Path(derivatives_dir) / "dataset_description.json").is_file():
            raise NoInputError(f"--input-derivatives {derivatives_dir} has no dataset_description.json")
        deriv_layout = _layout(derivatives_dir, None, subjects, derivatives=True)

    query = dict(datatype="dwi", suffix="dwi", extension=[".nii", ".nii.gz"])
    query.update({k: v for k, v in filters.items() if k not in ("extension", "suffix", "datatype", "desc")})
    if sessions:
        query["session"] = sessions
    desc = filters.get("desc", "preproc")
    inputs: list[DwiInput] = []
    for sub in subjects:
        raw_files = [] if "desc" in filters else layout.get(subject=sub, **query)
        raw_files = [f for f in raw_files if "desc" not in f.get_entities()]
        prep = []
        if deriv_layout is not None:
            prep = deriv_layout.get(subject=sub, desc=desc, **query)
        chosen = _unique_files(prep if prep else raw_files)
        if not chosen:
            if filters or sessions:
                err = NoMatchError(f"sub-{sub}: no DWI matches the session labels/filters")
            else:
                err = NoInputError(f"sub-{sub}: no DWI found (expected sub-{sub}/[ses-*/]dwi/*_dwi.nii[.gz])")
            if strict:
                raise err
            log.warning("%s; skipping this subject", err)
            continue
        lay = deriv_layout if prep else layout
        for f in chosen:
            inputs.append(_describe(lay, layout, f, "derivatives" if prep else "raw"))
    if not inputs:
        if filters or sessions:
            raise NoMatchError("no DWI matches the selected sessions/filters in any subject")
        raise NoInputError(f"no DWI found for any selected subject in {bids_dir}")
    return inputs


def _links_on(path: str) -> int:
    p = Path(path)
    return sum(q.is_symlink() for q in (p, *p.parents))


def _unique_files(files: list) -> list:
    """One file per real file: symbolic links (a loop, a file linked under another name) find the
    same DWI under several paths; the one through the fewest links, then the shortest, is kept."""
    best: dict = {}
    for f in files:
        real = os.path.realpath(f.path)
        key = (_links_on(f.path), len(f.path))
        if real not in best or key < best[real][0]:
            best[real] = (key, f)
    best = {real: f for real, (_, f) in best.items()}
    if len(best) < len(files):
        log.info("%d DWI paths lead to %d files (symbolic links); each file is processed once",
                 len(files), len(best))
    return sorted(best.values(), key=lambda f: f.path)


def _describe(lay, raw_layout, f, source: str) -> DwiInput:
    path = Path(f.path)
    ents = _entities(f)
    run = _run_label(f)
    if run is not None:
        ents["run"] = run
    try:
        bval = Path(lay.get_bval(f.path))
        bvec = Path(lay.get_bvec(f.path))
    except Exception:  # pybids raises a bare Exception/ValueError when nothing is found
        bval = bvec = None
    if bval is None or bvec is None or not bval.is_file() or not bvec.is_file():
        raise NoInputError(f"{path.name}: no .bval/.bvec found (next to it or inherited from a parent folder)")
    try:
        meta = f.get_metadata()
    except Exception:
        meta = {}
    mask = _find_mask(lay, f)
    t1w = _find_t1w(raw_layout, ents)
    return DwiInput(dwi=path, bval=bval, bvec=bvec, entities=ents, metadata=dict(meta), mask=mask,
                    t1w=t1w, source=source)


def _find_mask(lay, f) -> Path | None:
    """A brain mask shipped with the dataset for this run (same entities, desc-brain, suffix mask)."""
    ents = f.get_entities()
    q = {k: v for k, v in ents.items() if k in ("subject", "session", "acquisition", "run", "space")}
    try:
        cands = lay.get(suffix="mask", desc="brain", datatype="dwi", extension=[".nii", ".nii.gz"], **q)
    except Exception:
        cands = []
    if not cands:
        return None
    if len(cands) > 1:
        log.info("%s: several brain masks match; using %s", Path(f.path).name, cands[0].filename)
    return Path(cands[0].path)


def _find_t1w(layout, ents) -> Path | None:
    q = {"subject": ents["sub"], "suffix": "T1w", "datatype": "anat", "extension": [".nii", ".nii.gz"]}
    files = layout.get(session=ents["ses"], **q) if ents.get("ses") else []
    if not files:
        files = layout.get(**q)
    return Path(files[0].path) if files else None


def check_not_inside(bids_dir: Path, output_dir: Path):
    """The output must not live inside the raw dataset (it would be indexed as raw data)."""
    b = Path(bids_dir).resolve()
    o = Path(output_dir).resolve()
    if o == b:
        raise UsageError("output_dir is the same folder as bids_dir; choose a separate folder")
    if b in o.parents and not (o.relative_to(b).parts[0] == "derivatives"):
        raise UsageError(f"output_dir {output_dir} is inside the input dataset; put it outside bids_dir "
                         f"or under {Path(bids_dir) / 'derivatives'}")


def check_bids_dir(bids_dir: Path):
    if not Path(bids_dir).exists():
        raise NoInputError(f"bids_dir {bids_dir} does not exist")
    if not Path(bids_dir).is_dir():
        raise NoInputError(f"bids_dir {bids_dir} is not a folder")
    if not (Path(bids_dir) / "dataset_description.json").is_file():
        raise NoInputError(f"{bids_dir} has no dataset_description.json: not a BIDS dataset")


__all__ = ["DwiInput", "discover", "select_subjects", "load_filter_file", "check_not_inside",
           "check_bids_dir", "InputDataError"]
