"""One stage runner for every step that writes outputs: participant stages (DTI, ODF, tracking, QC),
TBSS registrations and bundle-segmentation tasks.

A :class:`Stage` declares its outputs, its parameters and its inputs (files, and upstream stages).
It is complete only when its **completion record** exists and matches: the record is written
last, atomically, after every output, and holds a fingerprint of the parameters, of the input
files' contents and of the upstream stages' own records (each run of a stage gets a new run id,
so re-running a stage re-runs everything downstream of it).  A stage about to rewrite its outputs
first removes its record, so a run killed between two outputs never leaves a "complete" stage
made of old and new files.

Records are small JSON files in a hidden ``.stages`` folder beside the stage's first output.
A Stage is a plain frozen dataclass of paths and JSON-able values: it pickles, so executor tasks
(a local pool or Dask workers) check and complete the stages they run.

Typical use::

    dti = Stage("sub-01_dti", outputs=(fa, md), params={"FitMethod": "WLS"}, files=(dwi, bval, bvec))
    odf = Stage("sub-01_odf-csd", outputs=(sh,), params={...}, upstream=(dti,))
    for stage, work in plan([(dti, fit_dti), (odf, fit_odf)], force=False):
        with stage.running():
            work()
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

RECORD_DIR = ".stages"
log = logging.getLogger(__name__)


class StageSkipped(Exception):
    """Raised by a stage's work that could not make its outputs but must not fail the run (a QC
    figure): the stage gets no record, so the next run tries again."""


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


_DIGESTS: dict = {}


def file_digest(path: Path | str) -> str:
    """Content hash of a file (BLAKE2b), remembered per process while size and mtime are unchanged."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


@dataclass(frozen=True)
class Stage:
    """A step that writes ``outputs`` from ``files`` and ``upstream`` stages' outputs with ``params``."""

    key: str                                  # unique name in its folder, e.g. "sub-01_dti"
    outputs: tuple = ()                       # paths written by the stage
    params: Mapping = field(default_factory=dict)
    files: tuple = ()                         # input files outside any stage (raw data, atlas...)
    upstream: tuple = ()                      # Stages whose outputs this one reads
    record_dir: Path | None = None            # default: .stages beside the first output

    def __post_init__(self):
        object.__setattr__(self, "outputs", tuple(Path(p) for p in self.outputs))
        object.__setattr__(self, "files", tuple(Path(p) for p in self.files))
        object.__setattr__(self, "upstream", tuple(self.upstream))
        if self.record_dir is None:
            if not self.outputs:
                raise ValueError(f"stage {self.key} declares no outputs and no record_dir")
            object.__setattr__(self, "record_dir", self.outputs[0].parent / RECORD_DIR)

    # ------------------------------------------------------------------ record
    @property
    def record_path(self) -> Path:
        return Path(self.record_dir) / f"{self.key}.json"

    def record(self) -> dict | None:
        try:
            rec = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def fingerprint(self) -> str | None:
        """Hash of parameters, input file contents and upstream records; None if an input is missing."""
        ups = []
        for st in self.upstream:
            rec = st.record()
            if rec is None:
                return None
            ups.append([st.key, rec.get("fingerprint"), rec.get("run")])
        try:   # by name and content: a moved or copied dataset keeps its records
            files = [[p.name, file_digest(p)] for p in self.files]
        except OSError:
            return None
        text = _canonical({"params": dict(self.params), "files": files, "upstream": ups})
        return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()

    def is_complete(self) -> bool:
        """The record matches today's inputs and parameters, and every output is still there."""
        rec = self.record()
        if rec is None or rec.get("fingerprint") is None:
            return False
        if rec["fingerprint"] != self.fingerprint():
            return False
        sizes = rec.get("outputs", {})
        for p in self.outputs:
            try:
                if p.stat().st_size != sizes.get(self._rel(p)):
                    return False
            except OSError:
                return False
        return True

    def _rel(self, path: Path) -> str:
        """An output's path relative to the record folder (records survive moving the folder)."""
        return os.path.relpath(path, self.record_dir)

    def invalidate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()

    @contextlib.contextmanager
    def running(self) -> Iterator["Stage"]:
        """Remove the record, run the body, check every output exists, then write the record."""
        self.invalidate()
        t0 = time.perf_counter()
        try:
            yield self
        except StageSkipped as exc:
            log.warning("%s: %s", self.key, exc)
            return
        missing = [str(p) for p in self.outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {self.key} did not write {', '.join(missing)}")
        self._write_record(time.perf_counter() - t0)

    def _write_record(self, seconds: float) -> None:
        from .derivatives import write_json
        fingerprint = self.fingerprint()
        rec = {"stage": self.key, "fingerprint": fingerprint, "run": uuid.uuid4().hex,
               "outputs": {self._rel(p): p.stat().st_size for p in self.outputs},
               "params": json.loads(_canonical(dict(self.params))),
               "inputs": [p.name for p in self.files] + [st.key for st in self.upstream],
               "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "version": __version__, "pid": os.getpid()}
        write_json(self.record_path, rec)


def plan(steps: Iterable[tuple[Stage, object]], force: bool = False) -> list[tuple[Stage, object]]:
    """The (stage, work) pairs that must run, in order: each stage that is not complete, and every
    stage downstream of one that will run (its inputs are about to change)."""
    todo, rerun = [], set()
    for stage, work in steps:
        stale = force or any(up.key in rerun for up in stage.upstream) or not stage.is_complete()
        if stale:
            rerun.add(stage.key)
            todo.append((stage, work))
    return todo
