"""A portable prebuilt Numba cache (what the image carries) spares a fresh cache folder any
compilation; a CPU chosen by the user turns it off."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULE = textwrap.dedent("""
    import numpy as np
    from numba import njit

    @njit(cache=True)
    def kernel(a):
        s = 0.0
        for i in range(a.shape[0]):
            s += a[i] * a[i]
        return s
""")

# build: compile for the generic CPU into the prebuilt folder (as `python -m kernels.warmup
# --portable` does); use: a fresh cache folder and the app's start-up, then count compilations
BUILD = "import numpy as np, warm_mod; print(warm_mod.kernel(np.arange(4.0)))"
USE = textwrap.dedent("""
    import json, os
    from kernels.warmup import use_prebuilt_cache
    copied = use_prebuilt_cache()
    from numba.core import event
    compiled = []
    class L(event.Listener):
        def on_start(self, ev): compiled.append(1)
        def on_end(self, ev): pass
    event.register("numba:compile", L())
    import numpy as np, warm_mod
    assert warm_mod.kernel(np.arange(4.0)) == 14.0
    print(json.dumps(dict(copied=copied, compiled=len(compiled), cpu=os.environ.get("NUMBA_CPU_NAME"))))
""")


def _python(code, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    base.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "src"), str(ROOT)]), **env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_prebuilt_portable_cache_spares_compilation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "warm_mod.py").write_text(MODULE)
    prebuilt = tmp_path / "prebuilt"
    _python(BUILD, tmp_path, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(prebuilt))
    assert list(prebuilt.rglob("*.nbi")) and list(prebuilt.rglob("*.nbc"))

    fresh = json.loads(_python(USE, tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "run1"),
                               TRACTOSCALE_NUMBA_PREBUILT=str(prebuilt)))
    assert fresh == {"copied": 2, "compiled": 0, "cpu": "generic"}
    # a second start finds the entries in place: nothing to copy, nothing to compile
    again = json.loads(_python(USE, tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "run1"),
                               TRACTOSCALE_NUMBA_PREBUILT=str(prebuilt)))
    assert again == {"copied": 0, "compiled": 0, "cpu": "generic"}
    # without the generic CPU the entries do not match: a user's own NUMBA_CPU_NAME wins
    host = json.loads(_python(USE, tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "run2"),
                              TRACTOSCALE_NUMBA_PREBUILT=str(prebuilt), NUMBA_CPU_NAME="host"))
    assert host == {"copied": -1, "compiled": 1, "cpu": "host"}
    # no prebuilt cache (a pip install): nothing changes
    plain = json.loads(_python(USE, tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "run3"),
                               TRACTOSCALE_NUMBA_PREBUILT=str(tmp_path / "none")))
    assert plain == {"copied": -1, "compiled": 1, "cpu": None}


def test_install_copies_only_missing_cache_entries(tmp_path):
    from kernels.warmup import install_prebuilt_cache
    pre = tmp_path / "pre" / "a" / "b"
    pre.mkdir(parents=True)
    (pre / "f.kernel-4.py311.nbi").write_bytes(b"index")
    (pre / "f.kernel-4.py311.1.nbc").write_bytes(b"code")
    (pre / "notes.txt").write_text("not a cache entry")
    dest = tmp_path / "cache" / "a" / "b"
    dest.mkdir(parents=True)
    (dest / "f.kernel-4.py311.nbi").write_bytes(b"mine")
    assert install_prebuilt_cache(tmp_path / "pre", tmp_path / "cache") == 1
    assert (dest / "f.kernel-4.py311.nbi").read_bytes() == b"mine"      # never overwritten
    assert (dest / "f.kernel-4.py311.1.nbc").read_bytes() == b"code"
    assert not (dest / "notes.txt").exists() and not list(dest.glob(".*tmp"))
