"""Open TRX files for reading only.

trx-python (0.6) memory-maps the arrays of an uncompressed TRX archive, or of a TRX folder, with
NumPy's mode ``"r+"`` (read-write, shared) even to read them. Opening a file on a read-only mount
(how every BIDS App mounts ``bids_dir``, and how clusters share atlases) or owned by another user
then fails with ``Permission denied``, and a stray write to one of the arrays would change the
user's file. :func:`open_trx` loads with trx-python's own parser but maps every array read-only.
(A compressed TRX is extracted to a temporary folder by trx-python and read from there.)
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def open_trx(path):
    """``with open_trx(path) as trx:`` a ``trx.trx_file_memmap.TrxFile`` whose arrays are mapped
    read-only (writing to them raises ``ValueError``); closed on exit. Errors are trx-python's
    (``ValueError``, ``OSError``, ``zipfile.BadZipFile`` ...): callers turn them into user errors."""
    from trx import trx_file_memmap as tfm

    original = tfm._create_memmap

    def read_only(filename, mode="r", *args, **kwargs):
        return original(filename, "r" if mode == "r+" else mode, *args, **kwargs)

    # _create_memmap is a module global of trx-python: swap it only while this thread loads, so
    # no other load sees it (nothing else in the app opens a TRX with "r+").
    with _PATCH_LOCK:
        tfm._create_memmap = read_only
        try:
            trx = tfm.load(str(Path(path)))
        finally:
            tfm._create_memmap = original
    try:
        yield trx
    finally:
        trx.close()
