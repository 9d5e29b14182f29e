"""TRX inputs are read without write access (bids_dir is mounted read-only in containers).

CI runs as root, which chmod does not stop: the read-only case runs its reader in a private mount
namespace where the folder is a read-only bind mount (root), or on files without write bits
(any other user). It skips when neither can be set up.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bids_app.demo.dataset import write_trx
from bids_app.trx_reader import open_trx

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (20, 20, 20)


def _bundles():
    rng = np.random.default_rng(3)
    line = lambda start, k: np.asarray(start, float) + np.outer(np.arange(k), [2.0, 0.5, 0.0])  # noqa: E731
    return {"AF_L": [line(rng.uniform(2, 6, 3), 8) for _ in range(5)],
            "CST_R": [line(rng.uniform(2, 6, 3) + [0, 10, 10], 6) for _ in range(3)]}


@pytest.fixture
def trx_dir(tmp_path) -> Path:
    """A folder with a tractogram (TRX, stored uncompressed: the memory-mapped case) and a NIfTI."""
    folder = tmp_path / "inputs"
    write_trx(_bundles(), SHAPE, AFFINE, folder / "tpl-test_tractogram.trx")
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_open_trx_maps_read_only_and_leaves_the_file_alone(trx_dir):
    path = trx_dir / "tpl-test_tractogram.trx"
    before = _digest(path)
    with open_trx(path) as trx:
        assert sorted(trx.groups) == ["AF_L", "CST_R"] and len(trx.streamlines) == 8
        data = trx.streamlines._data
        assert isinstance(data, np.memmap) and data.mode == "r"  # mapped, not read into memory
        with pytest.raises(ValueError):
            data[0, 0] = 1e6
    assert _digest(path) == before
    # trx-python's own loader still maps read-write: the reason for open_trx
    from trx.trx_file_memmap import load
    trx = load(str(path))
    assert trx.streamlines._data.mode == "r+"
    trx.close()


READER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    folder = Path(sys.argv[1])
    trx_path = folder / "tpl-test_tractogram.trx"
    out = {}
    if sys.argv[2] == "trx-python":   # the library as it is: asks for write access
        from trx.trx_file_memmap import load
        try:
            load(str(trx_path)).close()
            out["error"] = None
        except OSError as exc:
            import errno
            out["error"] = errno.errorcode[exc.errno]
    else:
        from bids_app.group.bundles.app import load_streamlines
        from bids_app.group.bundles.atlas import load_atlas
        from bids_app.qc import streamline_density
        out["streamlines"] = len(load_streamlines(trx_path))
        out["atlas"] = load_atlas(trx_path).counts()
        out["density"] = float(streamline_density(trx_path, (20, 20, 20), np.diag([2.0, 2, 2, 1])).sum())
    print(json.dumps(out))
""")


def run_read_only(folder: Path, *args: str) -> dict:
    """Run READER with ``folder`` genuinely read-only; its JSON answer."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = [sys.executable, "-c", READER, str(folder), *args]
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        cmd = code
    else:
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("running as root without unshare: cannot make a read-only mount")
        mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        cmd = [unshare, "--mount", "--propagation", "private", "sh", "-c", mount, str(folder)]
        probe = subprocess.run(cmd + ["sh", "-c", f'! touch "{folder}/probe" 2>/dev/null'],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()[:200]}")
        cmd = cmd + code
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_readers_work_on_a_read_only_folder(trx_dir):
    path = trx_dir / "tpl-test_tractogram.trx"
    before = _digest(path)
    # the folder really is read-only for the reader: trx-python's plain load fails there...
    assert run_read_only(trx_dir, "trx-python")["error"] in ("EROFS", "EACCES")
    # ...while the app's three readers get everything
    got = run_read_only(trx_dir, "app")
    assert got["streamlines"] == 8
    assert got["atlas"] == {"AF_L": 5, "CST_R": 3}
    points = np.concatenate([s for b in _bundles().values() for s in b])
    assert np.all(np.abs(points - 20) < 20)  # every point inside the 40 mm grid: each counts once
    assert got["density"] == len(points)
    assert _digest(path) == before
