"""Kernels of kernels/sinkhorn.py: exact values against NumPy, and CPU == CUDA simulator."""
import os

import numpy as np
import pytest
from scipy.special import logsumexp

from kernels import sinkhorn
from kernels.sinkhorn import get_backend

NPTS = 6


def _fibres(rng, n, w=1, scale=4.0):
    return rng.normal(scale=scale, size=(n * w, 3 * NPTS))


def _flip(v):
    n, d = v.shape
    return v.reshape(n, d // 3, 3)[:, ::-1].reshape(n, d)


def _costs(X, xw, Y, yw):
    """Dense (n, m) best-window half squared distances, as is and with Y reversed (NumPy)."""
    n, m = len(X) // xw, len(Y) // yw
    d0 = 0.5 * ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    d1 = 0.5 * ((X[:, None, :] - _flip(Y)[None, :, :]) ** 2).sum(-1)
    d0 = d0.reshape(n, xw, m, yw).min(axis=(1, 3))
    d1 = d1.reshape(n, xw, m, yw).min(axis=(1, 3))
    return d0, d1


def _dense(backend, n, m):
    to = backend.to_device
    return (to(np.zeros(n, np.int64)), to(np.array([0, 1], np.int64)), to(np.array([0], np.int64)),
            to(np.array([0, m], np.int64)))


@pytest.mark.parametrize("xw,yw", [(1, 1), (1, 3), (2, 1)])
def test_cpu_softmin_matches_numpy(xw, yw):
    rng = np.random.default_rng(0)
    n, m = 17, 23
    X, Y = _fibres(rng, n, xw), _fibres(rng, m, yw)
    h = rng.normal(size=m)
    eps, lam = 3.7, 0.8
    be = get_backend("cpu")
    out = be.softmin(be.fibres(X), xw, be.fibres(Y), yw, h, eps, lam, NPTS, *_dense(be, n, m))
    d0, d1 = _costs(X, xw, Y, yw)
    ref = -eps * lam * logsumexp(np.concatenate([h - d0 / eps, h - d1 / eps], axis=1), axis=1)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-9)


def test_block_sparsity_only_visits_kept_blocks():
    """Two row clusters, three column clusters; each row sees only its listed column blocks."""
    rng = np.random.default_rng(1)
    X, Y = _fibres(rng, 6), _fibres(rng, 9)
    h = rng.normal(size=9)
    row_cluster = np.array([0, 0, 0, 1, 1, 1])
    col_start = np.array([0, 3, 5, 9])
    ptr, idx = np.array([0, 2, 3]), np.array([0, 2, 1])      # cluster 0 -> {0, 2}, cluster 1 -> {1}
    be = get_backend("cpu")
    out = be.softmin(X, 1, Y, 1, h, 2.0, 1.0, NPTS, row_cluster, ptr, idx, col_start)
    d0, d1 = _costs(X, 1, Y, 1)
    cols = {0: np.r_[0:3, 5:9], 1: np.r_[3:5]}
    for i in range(6):
        c = cols[row_cluster[i]]
        ref = -2.0 * logsumexp(np.r_[h[c] - d0[i, c] / 2.0, h[c] - d1[i, c] / 2.0])
        assert out[i] == pytest.approx(ref, rel=1e-12)


def test_class_mass_and_nearest_match_numpy():
    rng = np.random.default_rng(2)
    n, m, yw = 11, 14, 2
    X, Y = _fibres(rng, n), _fibres(rng, m, yw)
    h, f = rng.normal(size=m), rng.normal(size=n)
    eps = 5.0
    col_class = np.array([1, 0])          # columns 0..6 -> class 1, 7..13 -> class 0
    be = get_backend("cpu")
    mass = be.class_mass(X, 1, Y, yw, h, f, eps, NPTS, np.zeros(n, np.int64), np.array([0, 2]),
                         np.array([0, 1]), np.array([0, 7, 14]), col_class, 2)
    d0, d1 = _costs(X, 1, Y, yw)
    term = np.exp(f[:, None] / eps + h[None] - d0 / eps) + np.exp(f[:, None] / eps + h[None] - d1 / eps)
    np.testing.assert_allclose(mass[:, 1], term[:, :7].sum(1), rtol=1e-11)
    np.testing.assert_allclose(mass[:, 0], term[:, 7:].sum(1), rtol=1e-11)
    arg, cost = be.nearest(X, 1, Y, yw, NPTS, *_dense(be, n, m))
    best = np.minimum(d0, d1)
    np.testing.assert_array_equal(arg, best.argmin(1))
    np.testing.assert_allclose(cost, best.min(1), rtol=1e-12)


def test_empty_row_gives_infinity():
    be = get_backend("cpu")
    X, Y = np.ones((2, 3 * NPTS)), np.zeros((3, 3 * NPTS))
    out = be.softmin(X, 1, Y, 1, np.zeros(3), 1.0, 1.0, NPTS, np.array([0, 1]), np.array([0, 1, 1]),
                     np.array([0]), np.array([0, 3]))
    assert np.isfinite(out[0]) and out[1] == np.inf


def test_cuda_simulator_agrees_with_cpu():
    """Same source compiled twice: the simulator's results equal the CPU kernels' in the same
    precision; the GPU's float32 default stays within float32 rounding of the CPU's float64."""
    if not sinkhorn._simulator_enabled():
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 before numba is imported (set by conftest)")
    rng = np.random.default_rng(3)
    n, m, yw = 9, 12, 2
    X, Y = _fibres(rng, n), _fibres(rng, m, yw)
    h, f = rng.normal(size=m), rng.normal(size=n)
    out = {}
    for name in ("cpu", "cuda"):
        for prec in ("float64", "float32"):
            be = get_backend(name, precision=prec)
            assert be.precision == prec
            Xd, Yd = be.fibres(X), be.fibres(Y)
            blocks = _dense(be, n, m)
            out[name, prec] = (be.softmin(Xd, 1, Yd, yw, h, 2.5, 0.9, NPTS, *blocks),
                               be.class_mass(Xd, 1, Yd, yw, h, f, 2.5, NPTS, *blocks,
                                             be.to_device(np.array([0], np.int64)), 1),
                               be.nearest(Xd, 1, Yd, yw, NPTS, *blocks))
    assert get_backend("cuda").precision == "float32" and get_backend("cpu").precision == "float64"
    # float32: exp/log of the libraries and the CPU's vectorised sums differ in the last bits;
    # a mass exp(-60) carries 60 x that relative error
    for prec, rtol, rtol_mass in (("float64", 1e-12, 1e-11), ("float32", 1e-6, 1e-4)):
        a, b = out["cpu", prec], out["cuda", prec]
        np.testing.assert_allclose(a[0], b[0], rtol=rtol)
        np.testing.assert_allclose(a[1], b[1], rtol=rtol_mass)
        np.testing.assert_array_equal(a[2][0], b[2][0])
    ref, gpu = out["cpu", "float64"], out["cuda", "float32"]
    np.testing.assert_allclose(ref[0], gpu[0], rtol=2e-6)     # costs ~100: float32 rounding
    np.testing.assert_allclose(ref[1], gpu[1], rtol=1e-4)     # exp of those costs / eps
    np.testing.assert_array_equal(ref[2][0], gpu[2][0])


def test_backend_selection():
    assert get_backend("cpu").name == "cpu"
    with pytest.raises(ValueError):
        get_backend("tpu")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        assert get_backend("auto").name == "cpu"     # the simulator is not a GPU


_PTX_SCRIPT = """
import sys, types
import numpy as np
sys.path.insert(0, {root!r})
from numba import cuda
from numba.cuda import dispatcher
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from kernels import sinkhorn
# the CPU kernels record the argument types the backends pass; the CUDA kernels get the same
be = sinkhorn.get_backend("cpu")
X, Y = np.ones((4, 18)), np.zeros((6, 18))
blocks = (np.zeros(4, np.int64), np.array([0, 1], np.int64), np.array([0], np.int64), np.array([0, 6], np.int64))
be.softmin(X, 1, Y, 1, np.zeros(6), 1.0, 1.0, 6, *blocks)
be.class_mass(X, 1, Y, 1, np.zeros(6), np.zeros(4), 1.0, 6, *blocks, np.array([0], np.int64), 1)
be.nearest(X, 1, Y, 1, 6, *blocks)
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print("NO-NVVM")
    sys.exit(0)
# the GPU's float32 kernels get the argument types of the CPU's float32 build
be32 = sinkhorn.get_backend("cpu", precision="float32")
be32.softmin(X, 1, Y, 1, np.zeros(6), 1.0, 1.0, 6, *blocks)
be32.class_mass(X, 1, Y, 1, np.zeros(6), np.zeros(4), 1.0, 6, *blocks, np.array([0], np.int64), 1)
be32.nearest(X, 1, Y, 1, 6, *blocks)
for cpu_k, gpu_k in zip(sinkhorn._kernels("cpu", "float32"), sinkhorn._kernels("cuda", "float32")):
    ptx, _ = cuda.compile_ptx(gpu_k.py_func, cpu_k.signatures[0], cc=(9, 0))
    assert ".target sm_90" in ptx and ".visible .entry" in ptx
    print("PTX", gpu_k.py_func.__name__, len(ptx))
"""


def test_cuda_kernels_compile_to_ptx_for_a_real_gpu():
    """Not the simulator: NVVM compiles the three OT kernels for an H100 (sm_90)."""
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("numba.cuda")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT.format(root=str(root))], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "NO-NVVM" in proc.stdout:
        pytest.skip("no NVVM installed (pip install numba-cuda[cu12])")
    assert proc.stdout.count("PTX ") == 3, proc.stdout
