"""BIDS-derivatives hygiene: names, atomic writes, dataset_description.json.

Every file tractoscale writes into ``output_dir`` goes through :func:`atomic_write`
(a hidden temporary name in the same folder, renamed when complete), so a crash
or a kill never leaves a half-written file under a real name.  Shared files are
updated under a :class:`filelock.FileLock` so concurrent participant runs (array
jobs) can share one output folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from filelock import FileLock

from . import __version__
from .config import TRACTOGRAM_FORMATS  # noqa: F401  (re-exported: file names of tractograms)
from .errors import OutputError

PIPELINE_NAME = "tractoscale"
CODE_URL = "https://github.com/tractoscale/tractoscale"

# Entity order used for every file name we build (BIDS core order, then the
# BEP016 model/param and BEP046 tract/track entities).
ENTITY_ORDER = (
    "sub", "ses", "acq", "rec", "dir", "run", "space", "res",
    "from", "to", "mode",          # transforms (BEP014)
    "model", "param",              # model maps (BEP016)
    "label", "tract", "track",     # tractography (BEP046)
    "contrast", "stat",            # statistical maps (BIDS stats models)
    "desc",
)
# pybids long names -> short keys
LONG_TO_SHORT = {
    "subject": "sub", "session": "ses", "acquisition": "acq",
    "reconstruction": "rec", "direction": "dir", "run": "run",
}
# the entities that identify one DWI run, and the tensor maps every run gets
RUN_ENTITIES = tuple(LONG_TO_SHORT.values())
TENSOR_SCALARS = ("fa", "md", "ad", "rd")


def bids_name(entities: dict, suffix: str, extension: str) -> str:
    """Build ``sub-01_ses-A_model-tensor_param-fa_dwimap.nii.gz`` from short-key entities."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    parts = [f"{k}-{entities[k]}" for k in ENTITY_ORDER if entities.get(k) not in (None, "")]
    if not extension.startswith("."):
        extension = "." + extension
    return "_".join(parts + [suffix]) + extension


def parse_entities(name: str) -> dict:
    """``sub-01_ses-A_model-tensor_param-fa_dwimap.nii.gz`` -> {"sub": "01", "ses": "A", ...}."""
    ents = {}
    for part in name.split(".")[0].split("_")[:-1]:
        if "-" in part:
            k, v = part.split("-", 1)
            ents[k] = v
    return ents


def subject_dir(output_dir: Path, entities: dict, datatype: str = "dwi") -> Path:
    """``output_dir/sub-X[/ses-Y]/<datatype>``."""
    d = Path(output_dir) / f"sub-{entities['sub']}"
    if entities.get("ses"):
        d = d / f"ses-{entities['ses']}"
    return d / datatype


def run_label(entities: dict) -> str:
    """``sub-01[_ses-A][_acq-...]``: the run's entities in BIDS order."""
    return "_".join(f"{k}-{entities[k]}" for k in RUN_ENTITIES if entities.get(k) not in (None, ""))


def tensor_map_path(directory: Path, entities: dict, param: str) -> Path:
    """``<directory>/<run>_model-tensor_param-<param>_dwimap.nii.gz``."""
    return Path(directory) / bids_name({**entities, "model": "tensor", "param": param}, "dwimap", ".nii.gz")


# Temporary names of unfinished outputs: ``.<stem>.partial-<host>-<pid>-<random><ext>`` (atomic_write)
# and ``.<name>.parts-<host>-<pid>-<random>/`` (the tractogram writer's chunks), <host> a short tag of
# the machine.  Their writer holds an exclusive flock on the file (on ``PARTS_LOCK`` inside a folder)
# while it lives; the kernel drops it when the process dies, however it dies, so
# :func:`remove_stale_temporaries` can tell them apart from files of live processes.
TEMP_MARKERS = (".partial-", ".parts-")
PARTS_LOCK = "owner.lock"
# Locks are certain on this machine; on a shared file system some mounts keep them local to each
# node (Lustre's localflock, NFS with local_lock), so another node's temporary also has to be
# untouched for this long before it counts as abandoned.
FOREIGN_MIN_AGE = 3600.0


def writable_parent(path: Path | str) -> Path:
    """Create ``path``'s folder if needed and check it is writable (OutputError otherwise), before a long
    job that ends by writing ``path`` (a trained model)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path.parent}: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write to {path.parent}")
    return path


def host_tag() -> str:
    """8 hex digits naming this machine in temporary names."""
    import hashlib
    import socket
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def hold_lock(path: Path | str, *, create_new: bool = False) -> int:
    """Open ``path`` (created if needed; ``create_new``: it must not exist) and hold an exclusive
    flock on it for as long as the returned descriptor stays open."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | (os.O_EXCL if create_new else 0), 0o666)
    with contextlib.suppress(OSError):   # a file system without locks: never swept, still written
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _is_held(path: Path) -> bool | None:
    """Whether a live process holds ``path``'s flock (None: cannot tell)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)         # also releases the lock just taken
    return False


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and any(m in name for m in TEMP_MARKERS)


def _temporaries(folder: Path, recursive: bool):
    if not recursive:
        with contextlib.suppress(OSError):
            yield from (Path(e.path) for e in os.scandir(folder) if _is_temporary(e.name))
        return
    for root, dirs, files in os.walk(folder):
        yield from (Path(root) / name for name in dirs + files if _is_temporary(name))
        dirs[:] = [d for d in dirs if not _is_temporary(d)]


def _last_change(path: Path, st: os.stat_result) -> float:
    """Latest modification of a temporary file, or of a parts folder and what it holds (the
    positions file grows at every chunk)."""
    latest = st.st_mtime
    if stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            for entry in os.scandir(path):
                latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
    return latest


def remove_stale_temporaries(folders, *, recursive: bool = True, min_age: float = 60.0) -> list[Path]:
    """Remove the temporary outputs (see ``TEMP_MARKERS``) of processes that no longer exist, in
    ``folders`` (and their subfolders if ``recursive``); return what was removed.

    A temporary is stale when no process holds its lock and it has not changed for ``min_age``
    seconds (a writer takes the lock right after creating it), or for ``FOREIGN_MIN_AGE`` if
    another machine wrote it."""
    import shutil
    mine = f"-{host_tag()}-"
    removed = []
    for folder in folders:
        for path in _temporaries(Path(folder), recursive):
            try:
                st = path.lstat()
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            age = time.time() - _last_change(path, st)
            if age < (min_age if mine in path.name else max(min_age, FOREIGN_MIN_AGE)):
                continue
            if _is_held(path / PARTS_LOCK if is_dir else path) is not False:
                continue
            try:
                shutil.rmtree(path) if is_dir else path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


def temporary_name(path: Path) -> str:
    """``.<stem>.partial-<host>-<pid>-<random><ext>``: hidden, unique, and keeping the extension so
    that libraries choosing a format by extension (nibabel, trx) still work."""
    name = path.name
    stem, ext = name, ""
    for e in (".nii.gz", ".tsv.gz", ".trx", ".json", ".tsv", ".nii", ".tck", ".trk", ".png", ".html",
              ".npz", ".txt", ".h5"):
        if name.endswith(e):
            stem, ext = name[: -len(e)], e
            break
    return f".{stem}.partial-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}"


def _write_failed(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    other = f" ({exc.filename})" if exc.filename and Path(os.fsdecode(exc.filename)).parent != path.parent else ""
    return OutputError(f"cannot write {path}: {reason}{other}")


@contextlib.contextmanager
def atomic_write(path: Path | str):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The temporary name is hidden and keeps the extension (:func:`temporary_name`); it is created
    empty and locked (see :func:`remove_stale_temporaries`).  On any exception the temporary file is
    removed and the real name is untouched; a file system error (disk full, read-only folder...)
    becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {path.parent}: {exc.strerror}") from None
    tmp = path.parent / temporary_name(path)
    try:
        fd = hold_lock(tmp, create_new=True)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: Path | str, data: dict) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path | str, *, header=None,
               dtype=np.float32, sidecar: dict | None = None) -> Path:
    """Write a NIfTI atomically (and its JSON sidecar, if given, next to it)."""
    path = Path(path)
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, affine, header=header)
    img.set_data_dtype(dtype)
    if header is not None:
        img.set_qform(affine, code=max(int(header["qform_code"]), 1))
        img.set_sform(affine, code=max(int(header["sform_code"]), 1))
    else:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_write(path) as tmp:
        nib.save(img, tmp)
    if sidecar is not None:
        write_json(sidecar_path(path), sidecar)
    return path


def sidecar_path(path: Path | str) -> Path:
    path = Path(path)
    name = path.name
    for e in (".nii.gz", ".nii", ".trx", ".tsv", ".tck", ".trk"):
        if name.endswith(e):
            return path.with_name(name[: -len(e)] + ".json")
    return path.with_suffix(".json")


def container_info() -> dict | None:
    """Container type and tag from the environment (set by our Dockerfile, or by Apptainer)."""
    ctype = os.environ.get("TRACTOSCALE_CONTAINER_TYPE")
    tag = os.environ.get("TRACTOSCALE_CONTAINER_TAG")
    sif = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    if sif:  # the image's own env says docker; Apptainer running it wins
        ctype = "singularity"
        tag = tag or sif
    if not ctype:
        return None
    info = {"Type": ctype}
    if tag:
        info["Tag"] = tag
    return info


def permission_hint(exc: OSError) -> str:
    """Advice for a Docker user whose output folder refused the container's user, or ''."""
    import errno
    info = container_info()
    if exc.errno not in (errno.EACCES, errno.EPERM) or not info or info["Type"] != "docker":
        return ""
    return (f" (the container runs as uid {os.getuid()}, which may not write there: "
            "run it as yourself with docker run -u \"$(id -u):$(id -g)\" ...)")


def generated_by() -> dict:
    entry = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL}
    container = container_info()
    if container:
        entry["Container"] = container
    return entry


def ensure_dataset_description(output_dir: Path | str, raw_dir: Path | str | None,
                               links: dict[str, Path | str] | None = None) -> Path:
    """Create or update ``output_dir/dataset_description.json`` under a file lock.

    Safe for many participant runs starting at once: the lock serialises them,
    the write is atomic, and an existing description from a previous run is
    merged (source datasets accumulated) rather than overwritten.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {output_dir}: {exc.strerror}") from None
    path = output_dir / "dataset_description.json"
    try:
        _update_description(output_dir, path, raw_dir, links)
    except OSError as exc:   # an unwritable lock file, a read-only folder...
        raise _write_failed(Path(os.fsdecode(exc.filename)) if exc.filename else path, exc) from exc
    return path


def _update_description(output_dir: Path, path: Path, raw_dir, links) -> None:
    with FileLock(str(output_dir / ".dataset_description.json.lock"), timeout=120):
        desc = {}
        if path.exists():
            try:
                desc = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                desc = {}
        desc.setdefault("Name", "tractoscale derivatives")
        desc["BIDSVersion"] = "1.10.0"
        desc["DatasetType"] = "derivative"
        gen = [g for g in desc.get("GeneratedBy", []) if g.get("Name") != PIPELINE_NAME]
        desc["GeneratedBy"] = [generated_by()] + gen
        sources = list(desc.get("SourceDatasets", []))
        new = []
        if raw_dir is not None:
            new.append({"URL": Path(raw_dir).resolve().as_uri()})
            desc.setdefault("DatasetLinks", {})["raw"] = Path(raw_dir).resolve().as_uri()
        for key, s in (links or {}).items():
            new.append({"URL": Path(s).resolve().as_uri()})
            desc.setdefault("DatasetLinks", {})[key] = Path(s).resolve().as_uri()
        for s in new:
            if s not in sources:
                sources.append(s)
        if sources:
            desc["SourceDatasets"] = sources
        write_json(path, desc)
        ignore = output_dir / ".bidsignore"
        if not ignore.exists():
            with atomic_write(ignore) as tmp:
                tmp.write_text("logs/\nwork/\ngroup/\nfigures/\n*.html\n*.trx\n*_tractogram.json\n*_bundles.tsv\n*_bundles.json\n")


def shared_lock(path: Path | str, timeout: float = 600) -> FileLock:
    """A file lock beside a shared output (group tables etc.)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.parent / f".{path.name}.lock"), timeout=timeout)
