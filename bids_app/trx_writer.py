"""Stream streamlines chunk by chunk into one TRX file (or .tck / .trk) with flat memory.

Chunks are appended to raw files in a hidden temporary folder beside the output; :meth:`close`
assembles the final file (a ZIP_STORED TRX archive, or a tck/trk written through nibabel's lazy
tractogram) under a temporary name and renames it into place with
:func:`bids_app.derivatives.atomic_write`.  Nothing is ever held whole in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .derivatives import TRACTOGRAM_FORMATS as FORMATS
from .derivatives import PARTS_LOCK, atomic_write, hold_lock, host_tag
from .errors import OutputError

_COPY_BLOCK = 16 << 20


class TrxStreamWriter:
    """Append chunks of streamlines; ``close()`` writes ``path`` atomically.

    ``dps`` maps a per-streamline key to ``(dtype, ncols)``; every :meth:`append` must give an
    array for each key.  ``float16`` stores TRX positions as float16 (about 0.03 mm precision at
    100 mm from the origin).
    """

    def __init__(self, path, affine, dimensions, *, dps: dict | None = None, float16: bool = False,
                 fmt: str | None = None):
        self.path = Path(path)
        self.fmt = (fmt or self.path.suffix.lstrip(".")).lower()
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown tractogram format {self.fmt!r} (expected {FORMATS})")
        self.affine = np.asarray(affine, dtype=np.float64)
        self.dimensions = [int(d) for d in dimensions][:3]
        self.pos_dtype = np.dtype(np.float16 if float16 else np.float32)
        self.dps_spec = {k: (np.dtype(dt), int(nc)) for k, (dt, nc) in (dps or {}).items()}
        self._closed = False
        self._files: list = []
        self._lock = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # named like atomic_write's temporaries (see bids_app.derivatives.TEMP_MARKERS)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.parts-{host_tag()}-{os.getpid()}-",
                                              dir=self.path.parent))
        except OSError as exc:
            raise OutputError(f"cannot write in {self.path.parent}: {exc.strerror}") from None
        try:
            # held until the parts are removed: a start-up sweep leaves a live writer's parts alone
            self._lock = hold_lock(self._tmp / PARTS_LOCK)
            self._pos = self._open("positions")
            self._len = self._open("lengths")
            self._dps = {k: self._open(f"dps_{k}") for k in self.dps_spec}
        except OSError as exc:
            self.abort()
            raise self._failed(exc) from exc
        self.n_streamlines = 0
        self.n_vertices = 0

    def _open(self, name: str):
        f = open(self._tmp / name, "wb")
        self._files.append(f)
        return f

    def _failed(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write {self.path}: {exc.strerror or exc}")

    # ------------------------------------------------------------------ writing
    def append(self, positions: np.ndarray, lengths: np.ndarray, dps: dict | None = None) -> None:
        """Add streamlines: ``positions`` (M, 3) world mm, ``lengths`` (k,) points each (sum M)."""
        positions = np.asarray(positions).reshape(-1, 3)
        lengths = np.asarray(lengths, dtype=np.uint64).ravel()
        if int(lengths.sum()) != len(positions):
            raise ValueError("lengths do not add up to the number of points")
        dps = dps or {}
        if set(dps) != set(self.dps_spec):
            raise ValueError(f"dps keys {sorted(dps)} != declared {sorted(self.dps_spec)}")
        k = len(lengths)
        try:
            for key, (dt, nc) in self.dps_spec.items():
                arr = np.asarray(dps[key], dtype=dt).reshape(k, nc) if nc > 1 else \
                    np.asarray(dps[key], dtype=dt).reshape(k)
                # one conversion to contiguous little-endian, written straight from the array's buffer
                self._dps[key].write(np.ascontiguousarray(arr, dtype=dt.newbyteorder("<")).data)
            self._pos.write(np.ascontiguousarray(positions, dtype=self.pos_dtype.newbyteorder("<")).data)
            self._len.write(lengths.astype("<u8").tobytes())
        except OSError as exc:     # disk full, quota...: the parts are dropped by abort()
            raise self._failed(exc) from exc
        self.n_streamlines += k
        self.n_vertices += len(positions)

    def close(self) -> Path:
        """Assemble the final file and remove the temporary parts."""
        if self._closed:
            return self.path
        try:
            self._close_files()
            if self.fmt == "trx":
                self._write_trx()
            else:
                self._write_nibabel()
        except OSError as exc:     # atomic_write names the path already; flushing the parts may fail too
            raise self._failed(exc) from exc
        finally:
            self._cleanup()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (the output path is not touched)."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self._close_files()
            self._cleanup()

    def _close_files(self):
        files, self._files = self._files, []
        errors = []
        for f in files:
            try:
                f.close()        # flushes: a full disk may only show here
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _cleanup(self):
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ------------------------------------------------------------------ assembling
    def _header(self) -> dict:
        return {"VOXEL_TO_RASMM": self.affine.tolist(), "DIMENSIONS": self.dimensions,
                "NB_VERTICES": int(self.n_vertices), "NB_STREAMLINES": int(self.n_streamlines)}

    def _offsets_file(self) -> Path:
        """offsets.uint64 (NB_STREAMLINES + 1 entries), computed from the lengths file in blocks."""
        out = self._tmp / "offsets"
        lengths = np.memmap(self._tmp / "lengths", dtype="<u8", mode="r") if self.n_streamlines \
            else np.zeros(0, "<u8")
        start = np.uint64(0)
        block = 1 << 22
        with open(out, "wb") as f:
            for i in range(0, len(lengths), block):
                part = np.asarray(lengths[i:i + block], dtype=np.uint64)
                offs = np.empty(len(part), dtype="<u8")
                offs[0] = start
                if len(part) > 1:
                    np.cumsum(part[:-1], out=offs[1:])
                    offs[1:] += start
                start = offs[-1] + part[-1]
                f.write(offs.tobytes())
            f.write(np.array([self.n_vertices], dtype="<u8").tobytes())
        del lengths
        return out

    def _write_trx(self) -> None:
        members = []
        if self.n_streamlines and self.n_vertices:
            members.append((f"positions.3.{self.pos_dtype.name}", self._tmp / "positions"))
            members.append(("offsets.uint64", self._offsets_file()))
            for key, (dt, nc) in self.dps_spec.items():
                name = f"dps/{key}.{nc}.{dt.name}" if nc > 1 else f"dps/{key}.{dt.name}"
                members.append((name, self._tmp / f"dps_{key}"))
        with atomic_write(self.path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr("header.json", json.dumps(self._header(), indent=1))
                for name, src in members:
                    with open(src, "rb") as fin, zf.open(name, "w", force_zip64=True) as fout:
                        shutil.copyfileobj(fin, fout, _COPY_BLOCK)

    def _iter_streamlines(self):
        if not self.n_streamlines:
            return
        pos = np.memmap(self._tmp / "positions", dtype=self.pos_dtype.newbyteorder("<"), mode="r")
        pos = pos.reshape(-1, 3)
        lengths = np.memmap(self._tmp / "lengths", dtype="<u8", mode="r")
        o = 0
        for n in lengths:
            n = int(n)
            yield np.asarray(pos[o:o + n], dtype=np.float32)
            o += n

    def _write_nibabel(self) -> None:
        import nibabel as nib
        from nibabel.streamlines import Field, LazyTractogram

        tract = LazyTractogram(self._iter_streamlines, affine_to_rasmm=np.eye(4))
        vs = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        if self.fmt == "trk":
            header = {Field.VOXEL_TO_RASMM: self.affine, Field.DIMENSIONS: np.array(self.dimensions),
                      Field.VOXEL_SIZES: vs,
                      Field.VOXEL_ORDER: "".join(nib.aff2axcodes(self.affine))}
            cls = nib.streamlines.TrkFile
        else:
            header = {}
            cls = nib.streamlines.TckFile
        with atomic_write(self.path) as tmp:
            cls(tract, header=header).save(str(tmp))
