"""The reports' interactive 3D view: niivue (https://github.com/niivue/niivue, BSD-2-Clause).

niivue's own browser build (``dist/niivue.umd.js`` of the npm package ``@niivue/niivue``, one
self-contained file of about 2.3 MB) is installed once per environment by
``tractoscale install-viewer`` (``npm pack``, checked against the pinned integrity hash), into
``<sys.prefix>/share/tractoscale/niivue/``.  Nothing of it is kept in this repository.  At report time
it is copied into the output folder (``figures/niivue/``) so a report opens from a laptop with no
network.

Browsers refuse ``fetch()`` of ``file://`` addresses, so the data a view shows cannot be read from the
.trx/.nii.gz files beside the report: each report gets a small *display copy* (a random subset of the
streamlines, points thinned to about one voxel apart; FA as 8-bit) embedded in a JavaScript file that
a plain ``<script>`` tag loads.  The report says how many streamlines the view shows.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..derivatives import atomic_write
from ..errors import NoInputError, OutputError

log = logging.getLogger(__name__)

NIIVUE_PACKAGE = "@niivue/niivue"
NIIVUE_VERSION = "0.69.0"
# dist.integrity of the npm release (what package-lock.json would pin)
NIIVUE_INTEGRITY = "sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJkA=="
BUNDLE = "niivue.umd.js"
ENV_VAR = "TRACTOSCALE_NIIVUE"          # a niivue.umd.js (or its folder) to use instead
OUTPUT_SUBDIR = ("figures", "niivue")   # where reports find it, relative to output_dir

# display copies: at most this many streamlines per view, points about one voxel apart
MAX_STREAMLINES = 10_000
MAX_BUNDLE_STREAMLINES = 2_000


# --------------------------------------------------------------------------- the niivue bundle

def default_install_dir() -> Path:
    return Path(sys.prefix) / "share" / "tractoscale" / "niivue"


def installed_bundle() -> Path | None:
    """niivue.umd.js of this environment (``$TRACTOSCALE_NIIVUE`` first), or None."""
    env = os.environ.get(ENV_VAR)
    for cand in ([Path(env)] if env else []) + [default_install_dir()]:
        path = cand / BUNDLE if cand.is_dir() else cand
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


def _integrity(path: Path) -> str:
    h = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(h).decode()


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise NoInputError("npm is not installed: install Node.js/npm, or download the package elsewhere "
                           f"(npm pack {NIIVUE_PACKAGE}@{NIIVUE_VERSION}) and pass it with --tarball")
    proc = subprocess.run([npm, "pack", f"{NIIVUE_PACKAGE}@{NIIVUE_VERSION}", "--silent"], cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    names = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().endswith(".tgz")]
    if proc.returncode != 0 or not names:
        raise NoInputError(f"npm pack {NIIVUE_PACKAGE}@{NIIVUE_VERSION} failed: "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or proc.returncode}")
    return workdir / names[-1]


def install(dest: Path | None = None, tarball: Path | None = None, force: bool = False) -> Path:
    """Fetch niivue's release with npm (or read ``tarball``), check its hash, and keep its browser
    bundle, package.json and a NOTICE in ``dest`` (nothing to do when this version is already there,
    unless ``force``).  Returns the installed bundle's path."""
    dest = Path(dest) if dest else default_install_dir()
    if not force and tarball is None and (dest / BUNDLE).is_file() and bundle_version(dest / BUNDLE) == NIIVUE_VERSION:
        return dest / BUNDLE
    with tempfile.TemporaryDirectory(prefix="tractoscale-niivue-") as tmp:
        tgz = Path(tarball) if tarball else _npm_pack(Path(tmp))
        if not tgz.is_file():
            raise NoInputError(f"no such file: {tgz}")
        got = _integrity(tgz)
        if got != NIIVUE_INTEGRITY:
            raise NoInputError(f"{tgz.name} is not {NIIVUE_PACKAGE} {NIIVUE_VERSION} (hash {got[:24]}..., "
                               f"expected {NIIVUE_INTEGRITY[:24]}...)")
        with tarfile.open(tgz) as tar:
            bundle = tar.extractfile(f"package/dist/{BUNDLE}").read()
            meta = json.loads(tar.extractfile("package/package.json").read())
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {dest}: {exc.strerror}") from None
    with atomic_write(dest / "package.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    with atomic_write(dest / "NOTICE.txt") as tmp:
        tmp.write_text(_notice(meta))
    with atomic_write(dest / BUNDLE) as tmp:
        tmp.write_bytes(bundle)
    return dest / BUNDLE


def _notice(meta: dict) -> str:
    deps = ", ".join(sorted(meta.get("dependencies", {})))
    return (f"{BUNDLE} is the browser build of {meta['name']} {meta['version']} from the npm registry,\n"
            f"licence {meta.get('license')} (copyright the niivue authors), source "
            f"{(meta.get('repository') or {}).get('url', 'https://github.com/niivue/niivue')}.\n"
            f"It bundles its npm dependencies ({deps}); their licences are MIT or ISC.\n"
            "package.json beside this file is the package's own.\n")


def copy_bundle(output_dir: Path) -> Path | None:
    """The bundle and its notice in ``output_dir/figures/niivue/`` (copied when missing or different);
    None when niivue is not installed in this environment."""
    src = installed_bundle()
    if src is None:
        return None
    dest = Path(output_dir).joinpath(*OUTPUT_SUBDIR)
    for name in (BUNDLE, "NOTICE.txt", "package.json"):
        s = src.parent / name if name != BUNDLE else src
        d = dest / name
        if not s.exists():
            continue
        if d.exists() and d.stat().st_size == s.stat().st_size and d.read_bytes() == s.read_bytes():
            continue
        with atomic_write(d) as tmp:
            shutil.copyfile(s, tmp)
    return dest / BUNDLE


def bundle_version(path: Path | None) -> str | None:
    """The niivue version beside an installed bundle (from its package.json)."""
    if path is None:
        return None
    try:
        return json.loads((Path(path).parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- display copies

def _thin(streamline: np.ndarray, spacing: float) -> np.ndarray:
    """Every k-th point (k from the mean step), keeping both ends."""
    if len(streamline) < 3:
        return streamline
    step = float(np.linalg.norm(np.diff(streamline[:2], axis=0)))
    k = max(1, int(round(spacing / step))) if step > 0 else 1
    idx = np.arange(0, len(streamline), k)
    if idx[-1] != len(streamline) - 1:
        idx = np.append(idx, len(streamline) - 1)
    return streamline[idx]


def subset(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a random subset of at most ``limit`` of ``n`` items (all when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def trx_bytes(streamlines, reference: nib.Nifti1Image, spacing: float, groups: dict | None = None) -> bytes:
    """A TRX (float16 positions, RAS+ mm: 0.03 mm or better within 64 mm of the origin, half the size of
    float32) of ``streamlines`` thinned to ``spacing`` mm, as bytes."""
    from nibabel.streamlines import Tractogram
    from trx.trx_file_memmap import TrxFile, save

    thinned = [_thin(np.asarray(s, np.float32), spacing) for s in streamlines]
    trx = TrxFile.from_tractogram(Tractogram(thinned, affine_to_rasmm=np.eye(4)), reference=reference,
                                  dtype_dict={"positions": np.float16, "offsets": np.uint32, "dpv": {},
                                              "dps": {}})
    try:
        if groups:
            trx.groups = {k: np.asarray(v, np.uint32) for k, v in groups.items() if len(v)}
        with tempfile.TemporaryDirectory(prefix="tractoscale-view-") as tmp:
            path = Path(tmp) / "view.trx"
            save(trx, str(path))
            return path.read_bytes()
    finally:
        trx.close()


def volume_bytes(data: np.ndarray, affine: np.ndarray, vmax: float = 1.0) -> bytes:
    """An 8-bit NIfTI (gzip) of ``data`` scaled to 0..vmax, as bytes."""
    import gzip
    q = np.clip(np.nan_to_num(np.asarray(data, np.float32)) / vmax, 0, 1)
    img = nib.Nifti1Image(np.round(q * 255).astype(np.uint8), affine)
    img.header.set_slope_inter(vmax / 255.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, vmax
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_data_script(path: Path, key: str, items: list[dict]) -> Path:
    """A script that hands the view's files to the report's viewer code:
    ``tractoscaleViewer.add(key, [{name, kind, data (base64), ...}, ...])``."""
    payload = [{**{k: v for k, v in it.items() if k != "bytes"},
                "data": base64.b64encode(it["bytes"]).decode("ascii")} for it in items]
    text = ("/* display copy written by tractoscale: see the report */\n"
            f"tractoscaleViewer.add({json.dumps(key)}, {json.dumps(payload)});\n")
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path
