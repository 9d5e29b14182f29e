"""The unbalanced Sinkhorn solver (bids_app/group/bundles/ot.py) against independent references."""
import numpy as np
import pytest
from scipy.special import logsumexp

from bids_app.group.bundles import fibres, ot, synthetic
from kernels import sinkhorn
from kernels.sinkhorn import get_backend


def _reference_potentials(X, Y, a, b, eps, reach, iters=3000):
    """Plain log-domain Sinkhorn on explicit copies: every fibre and its reversal, half mass each."""
    Xe = np.concatenate([X, fibres.flip(X)])
    Ye = np.concatenate([Y, fibres.flip(Y)])
    la = np.log(np.concatenate([a, a]) / 2)
    lb = np.log(np.concatenate([b, b]) / 2)
    C = 0.5 * ((Xe[:, None] - Ye[None]) ** 2).sum(-1)
    lam = 1.0 if reach is None else 1 / (1 + eps / reach ** 2)
    f, g = np.zeros(len(Xe)), np.zeros(len(Ye))
    for _ in range(iters):
        f = -lam * eps * logsumexp(lb[None] + (g[None] - C) / eps, axis=1)
        g = -lam * eps * logsumexp(la[:, None] + (f[:, None] - C) / eps, axis=0)
    return f, g, C


@pytest.mark.parametrize("reach", [None, 6.0])
def test_fixed_point_equals_explicit_flipped_copies(reach):
    """Implicit orientation handling == adding reversed copies to both measures."""
    rng = np.random.default_rng(0)
    P = rng.normal(scale=3, size=(7, 5, 3)) + np.linspace(0, 20, 5)[None, :, None]
    Q = rng.normal(scale=3, size=(9, 5, 3)) + np.linspace(0, 20, 5)[None, :, None]
    Q[::2] = Q[::2, ::-1]                       # half the atlas runs the other way
    X, Y = fibres.to_vectors(P), fibres.to_vectors(Q)
    a = np.full(7, 1 / 7)
    b = np.full(9, 1 / 9)
    params = ot.OTParams(blur=2.0, reach=reach, final_iters=3000, tol=1e-13, outlier_level=0.0)
    res = ot.transport_labels(X, Y, np.zeros(9, np.int64), 1, params)
    f_ref, g_ref, C = _reference_potentials(X, Y, a, b, 4.0, reach)
    # balanced potentials are defined up to f + c, g - c
    shift = 0.0 if reach is not None else np.mean(res.f - f_ref[:7])
    np.testing.assert_allclose(res.f - shift, f_ref[:7], atol=1e-6)
    np.testing.assert_allclose(res.f - shift, f_ref[7:], atol=1e-6)   # reversed copies: same potential
    np.testing.assert_allclose(res.g + shift, g_ref[:9], atol=1e-6)
    # transported mass per unit of subject mass: exp(-f/rho) (unbalanced), 1 (balanced)
    expected = np.ones(7) if reach is None else np.exp(-res.f / reach ** 2)
    np.testing.assert_allclose(res.class_mass[:, 0], expected, rtol=1e-5)


def test_epsilon_schedule():
    eps = ot.epsilon_schedule(100.0, 3.0, 0.9)
    assert eps[0] == pytest.approx(100.0 ** 2) and eps[-1] == pytest.approx(9.0)
    ratios = np.array(eps[1:-1]) / np.array(eps[:-2])
    np.testing.assert_allclose(ratios, 0.81)
    assert ot.dampening(9.0, 20.0) == pytest.approx(1 / (1 + 9 / 400)) and ot.dampening(9.0, None) == 1.0


def test_labels_and_outlier_class():
    """Two bundles; subject fibres near each get its label; one far fibre is an outlier."""
    rng = np.random.default_rng(1)
    t = np.linspace(0, 40, 20)[None, :, None]
    A = np.zeros((30, 20, 3)) + t * np.array([1, 0, 0]) + rng.normal(scale=1, size=(30, 1, 3))
    B = np.zeros((30, 20, 3)) + t * np.array([0, 1, 0]) + rng.normal(scale=1, size=(30, 1, 3)) + [0, 0, 15]
    atlas = fibres.to_vectors(np.concatenate([A, B]))
    lab = np.r_[np.zeros(30), np.ones(30)].astype(int)
    subj = np.concatenate([A[:10] + 1.0, B[:8, ::-1] - 1.0, A[:1] + [0, 0, 80]])   # reversed fibres too
    res = ot.transport_labels(fibres.to_vectors(subj), atlas, lab, 2, ot.OTParams(reach=10.0))
    np.testing.assert_array_equal(res.labels, np.r_[np.zeros(10), np.ones(8), [-1]])
    none = ot.transport_labels(fibres.to_vectors(subj), atlas, lab, 2,
                               ot.OTParams(reach=10.0, outlier_level=0.0))
    assert none.labels[-1] >= 0


def _separated(n, seed):
    """Phantom fibres copied into 6 far-apart places (so most cluster blocks can be skipped)."""
    pts, lab = synthetic.large_tractogram(n, seed=seed, jitter=1.5)
    shift = (np.arange(n) % 6)[:, None, None] * np.array([150.0, 0, 0])
    return fibres.to_vectors(pts + shift), lab + 7 * (np.arange(n) % 6)


def test_multiscale_matches_dense_with_fewer_pairs():
    """Once both have converged at the final blur, the truncated multiscale plan equals the dense one."""
    X, xl = _separated(900, 1)
    Y, yl = _separated(750, 2)
    common = dict(reach=6.0, final_iters=40, tol=1e-4)
    dense = ot.transport_labels(X, Y, yl, 42, ot.OTParams(dense_limit=10 ** 9, **common))
    multi = ot.transport_labels(X, Y, yl, 42, ot.OTParams(dense_limit=0, n_clusters=48, **common))
    assert multi.stats["multiscale"] and not dense.stats["multiscale"]
    assert multi.stats["pair_fraction"] < 0.3
    assert np.mean(dense.labels == xl) > 0.99
    np.testing.assert_array_equal(multi.labels, dense.labels)
    np.testing.assert_allclose(multi.class_mass, dense.class_mass, atol=1e-3)


@pytest.mark.parametrize("dense_limit", [10 ** 9, 0])
def test_solver_cpu_and_cuda_simulator_agree(dense_limit):
    if not sinkhorn._simulator_enabled():
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 before numba is imported (set by conftest)")
    from bids_app.group.bundles.atlas import Atlas
    P, xl = synthetic.large_tractogram(24, seed=1, jitter=1.5, npts=6)
    Q, yl = synthetic.large_tractogram(20, seed=2, jitter=1.5, npts=6)
    Yw = Atlas([str(k) for k in range(7)], Q, yl).with_fragments(((0.5, 1),)).window_vectors()   # 2 windows
    params = ot.OTParams(reach=6.0, scaling=0.6, final_iters=2, dense_limit=dense_limit, n_clusters=4)
    out = {(name, prec): ot.transport_labels(fibres.to_vectors(P), Yw, yl, 7, params,
                                             backend=get_backend(name, precision=prec))
           for name, prec in (("cpu", "float64"), ("cuda", "float64"), ("cuda", "float32"))}
    cpu, cuda64, cuda32 = out["cpu", "float64"], out["cuda", "float64"], out["cuda", "float32"]
    # the same source and precision on both targets
    np.testing.assert_allclose(cpu.f, cuda64.f, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cpu.g, cuda64.g, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(cpu.labels, cuda64.labels)
    # the GPU's default, float32: potentials to float32 rounding of the costs, the same labels
    scale = max(np.abs(cpu.f).max(), np.abs(cpu.g).max())
    np.testing.assert_allclose(cpu.f, cuda32.f, atol=1e-5 * scale)
    np.testing.assert_allclose(cpu.g, cuda32.g, atol=1e-5 * scale)
    np.testing.assert_array_equal(cpu.labels, cuda32.labels)
    assert cpu.stats["multiscale"] == (dense_limit == 0)


def test_windowed_atlas_multiscale_matches_dense():
    """Atlas fibres with windows (sub-fibres): same plan with and without cluster truncation."""
    from bids_app.group.bundles.atlas import Atlas
    pts, lab = synthetic.large_tractogram(360, seed=2, jitter=1.5, npts=10)
    shift = (np.arange(360) % 3)[:, None, None] * np.array([120.0, 0, 0])
    atlas = Atlas([str(k) for k in range(21)], pts + shift, lab + 7 * (np.arange(360) % 3))
    atlas = atlas.with_fragments(((0.6, 2), (0.35, 3)))
    sub, sl = synthetic.large_tractogram(400, seed=3, jitter=1.5, npts=10)
    sub = sub + (np.arange(400) % 3)[:, None, None] * np.array([120.0, 0, 0])
    sub = fibres.resample([s[:5] if k % 4 == 0 else s for k, s in enumerate(sub)], 10)   # 1/4 halves
    X = fibres.to_vectors(sub)
    Y = atlas.window_vectors()
    assert Y.shape == (360, 6, 30)
    common = dict(reach=6.0, final_iters=40, tol=1e-4)
    dense = ot.transport_labels(X, Y, atlas.labels, 21, ot.OTParams(dense_limit=10 ** 9, **common))
    multi = ot.transport_labels(X, Y, atlas.labels, 21, ot.OTParams(dense_limit=0, n_clusters=24, **common))
    truth = sl + 7 * (np.arange(400) % 3)
    assert np.mean(dense.labels == truth) > 0.97
    assert multi.stats["pair_fraction"] < 0.6
    np.testing.assert_array_equal(multi.labels, dense.labels)
    np.testing.assert_allclose(multi.class_mass, dense.class_mass, atol=1e-3)
