"""The constrained least-squares kernel (kernels/qp.py) and multi-shell multi-tissue CSD against DIPY."""
import numpy as np
import pytest

from kernels.qp import OK, ConstrainedLeastSquares


def _problem(n=8, nv=30, N=70, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(nv, n))
    Y = X @ rng.normal(size=(n, N)) + 0.5 * rng.normal(size=(nv, N))
    return X, Y.T.copy()


def test_bounds_only_is_nnls():
    """With C = I the problem is non-negative least squares: scipy's NNLS gives the same answer."""
    from scipy.optimize import nnls
    X, Y = _problem()
    x, status = ConstrainedLeastSquares(X, np.eye(X.shape[1])).solve(Y)
    assert (status == OK).all()
    for i in range(len(Y)):
        ref, _ = nnls(X, Y[i])
        np.testing.assert_allclose(x[i], ref, atol=1e-8)
    assert x.min() > -1e-12 and (np.abs(x) < 1e-12).sum() > 50     # many bounds are active


def test_general_constraints_meet_kkt():
    """Random constraint directions: feasible, and no feasible descent direction (KKT via NNLS on
    the active constraints' multipliers)."""
    from scipy.optimize import nnls
    X, Y = _problem(seed=1)
    C = np.random.default_rng(2).normal(size=(X.shape[1], 25))
    x, status = ConstrainedLeastSquares(X, C).solve(Y)
    assert (status == OK).all()
    for i in range(len(Y)):
        s = C.T @ x[i]
        assert s.min() > -1e-8
        grad = X.T @ (X @ x[i] - Y[i])                     # gradient of 0.5 |Xx - y|^2
        active = np.flatnonzero(np.abs(s) < 1e-7)
        # grad = C_A u with u >= 0 at the optimum
        if len(active):
            u, res = nnls(C[:, active], grad)
        else:
            res = np.linalg.norm(grad)
        assert res < 1e-6 * max(1.0, np.linalg.norm(grad)), i


def test_warm_start_does_not_change_the_answer():
    """Voxels are warm-started from their neighbour: the order of the voxels must not matter."""
    X, Y = _problem(seed=3)
    C = np.random.default_rng(4).normal(size=(X.shape[1], 40))
    solver = ConstrainedLeastSquares(X, C)
    a, _ = solver.solve(Y)
    perm = np.random.default_rng(5).permutation(len(Y))
    b, _ = solver.solve(Y[perm])
    np.testing.assert_allclose(a[perm], b, atol=1e-9)


def test_cuda_kernel_matches_cpu():
    """The same source compiled for CUDA (the simulator in CI) gives the CPU's answer."""
    X, Y = _problem(n=6, nv=12, N=40, seed=6)
    C = np.random.default_rng(7).normal(size=(6, 12))
    solver = ConstrainedLeastSquares(X, C)
    cpu, s1 = solver.solve(Y)
    gpu, s2 = solver.solve(Y, device="cuda", chunk=64)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_allclose(cpu, gpu, atol=1e-9)


# --------------------------------------------------------------------------- MSMT-CSD vs DIPY

@pytest.fixture(scope="module")
def multishell():
    from bids_app.demo import demo_grid, make_gradients, simulate_subject
    shape, aff = demo_grid("small", orientation="LAS", oblique_deg=(0.0, 10.0, -15.0))
    bvals, bvecs = make_gradients((1000, 2000, 3000), 40, b0_every=12, seed=3)
    sub = simulate_subject(shape=shape, affine=aff, bvals=bvals, bvecs_voxel=bvecs, seed=2, snr=40)
    return sub, bvals, bvecs, aff


def test_msmt_matches_dipy_on_the_same_voxels(multishell):
    """Our MSMT-CSD (DIPY's model matrices, our exact solver) against DIPY's own fit (cvxpy) on the
    same voxels and responses: the same minimum, hence the same ODFs, to the solvers' tolerance."""
    pytest.importorskip("cvxpy")
    from dipy.core.gradients import gradient_table
    from dipy.data import default_sphere
    from dipy.reconst.mcsd import MultiShellDeconvModel, multi_shell_fiber_response
    from dipy.reconst.shm import sh_to_sf

    from bids_app.inputs import DwiData
    from bids_app.models import fit_dti, fit_odf
    from kernels.frames import convert_sh

    sub, bvals, bvecs, aff = multishell
    mask = sub.brain_mask
    dwi = DwiData(signal=sub.dwi[mask], mask=mask, mean_b0=sub.dwi[..., 0], affine=aff, header=None,
                  bvals=bvals, bvecs=bvecs, zooms=(2.5, 2.5, 2.5))
    dti = fit_dti(dwi, mask)
    res = fit_odf(dwi, mask, "csd", None, fa=dti.fa, md=dti.md)
    assert "BValues" in res.parameters and res.parameters["BValues"] == [1000.0, 2000.0, 3000.0]
    assert res.parameters["UnsolvedVoxels"] == 0
    # DIPY with the responses we estimated, on the same (voxel-frame) gradients, hence the same
    # non-negativity directions; our world-frame SH taken back to the voxel frame
    r = res.parameters["ResponseFunctions"]
    resp = {k: np.array([list(e) + [s0] for e, s0 in zip(r[k]["Eigenvalues"], r[k]["S0"])]) for k in r}
    L = res.sh_order
    response = multi_shell_fiber_response(L, bvals=np.array([0, 1000, 2000, 3000.0]), wm_rf=resp["WM"],
                                          gm_rf=resp["GM"], csf_rf=resp["CSF"])
    model = MultiShellDeconvModel(gradient_table(bvals, bvecs=bvecs, b0_threshold=50), response,
                                  sh_order_max=L, reg_sphere=default_sphere)
    rng = np.random.default_rng(0)
    fa = dti.fa[mask]
    pick = np.r_[rng.choice(np.flatnonzero(fa > 0.5), 12, replace=False),
                 rng.choice(np.flatnonzero(fa < 0.2), 12, replace=False)]
    fit = model.fit(dwi.signal[pick])
    theirs = fit.shm_coeff
    ours = convert_sh(res.sh[mask][pick], basis="tournier07", legacy=False, frame="world", affine=aff,
                      to_basis="descoteaux07", to_legacy=True, to_frame="voxel", dtype=np.float64)
    # ours is the exact minimum (feasible, KKT conditions to rounding); DIPY's cvxpy call stops at
    # its default tolerance, with constraint violations of ~1e-5 (a general solver pushed to 1e-12
    # still violates them by ~1e-6), so the fits agree to that tolerance only
    from scipy.optimize import nnls
    X, G = model._X, model.fitter._reg
    y = dwi.signal[pick].astype(np.float64)
    x_ours, status = ConstrainedLeastSquares(X, G.T).solve(y)
    assert (status == OK).all()
    for i in range(len(pick)):
        s = G @ x_ours[i]
        assert s.min() > -1e-12 * np.abs(s).max()
        grad = X.T @ (X @ x_ours[i] - y[i])
        active = np.flatnonzero(np.abs(s) < 1e-9 * np.abs(s).max())
        _, resid = nnls(G[active].T, grad)
        assert resid < 1e-9 * np.linalg.norm(grad)
    sf_theirs = sh_to_sf(theirs, default_sphere, sh_order_max=L, basis_type="descoteaux07", legacy=True)
    sf_ours = sh_to_sf(ours, default_sphere, sh_order_max=L, basis_type="descoteaux07", legacy=True)
    scale = np.abs(sf_theirs).max()
    err = np.abs(sf_ours - sf_theirs) / scale
    assert np.median(err) < 1e-3 and err.max() < 3e-2, (np.median(err), err.max())
    assert sf_ours.min() > -1e-6 * scale.max()                 # non-negative (hard constraint)


def _msmt_problem(multishell, n_voxels=400):
    """DIPY's MSMT-CSD matrices on the multi-shell phantom, and the signal of a run of consecutive
    brain voxels (spatial order, as the fit gives them)."""
    from dipy.core.gradients import gradient_table
    from dipy.data import default_sphere
    from dipy.reconst.mcsd import MultiShellDeconvModel, multi_shell_fiber_response

    sub, bvals, bvecs, _ = multishell
    mask = sub.brain_mask
    # responses close to the phantom's tissues: WM (1.7, 0.3, 0.3) um^2/ms, GM 0.8, CSF 3.0
    rf = lambda ev, s0: np.array([[*ev, s0]] * 4)                                  # noqa: E731
    response = multi_shell_fiber_response(8, bvals=np.array([0, 1000, 2000, 3000.0]),
                                          wm_rf=rf((1.7e-3, 0.3e-3, 0.3e-3), 100.0),
                                          gm_rf=rf((0.8e-3,) * 3, 100.0), csf_rf=rf((3e-3,) * 3, 100.0))
    model = MultiShellDeconvModel(gradient_table(bvals, bvecs=bvecs, b0_threshold=50), response,
                                  sh_order_max=8, reg_sphere=default_sphere)
    start = int(mask.sum()) // 2
    return model._X, model.fitter._reg, sub.dwi[mask][start:start + n_voxels].astype(np.float64)


def test_warm_start_gives_the_cold_minimum_on_msmt_voxels(multishell):
    """Consecutive brain voxels warm-started from one another reach the same minimum as each voxel
    solved from scratch, and it meets the KKT conditions (feasible, gradient in the cone of the
    active constraints' normals)."""
    from scipy.optimize import nnls
    X, G, Y = _msmt_problem(multishell)
    solver = ConstrainedLeastSquares(X, G.T)
    warm, s1, steps_warm = solver.solve(Y, steps=True)
    cold, s2, steps_cold = solver.solve(Y, steps=True, warm=False)
    assert (s1 == OK).all() and (s2 == OK).all()
    assert steps_cold.mean() > 20                  # real active-set work: many constraints end active
    scale = np.abs(cold).max(axis=1, keepdims=True)
    np.testing.assert_allclose(warm / scale, cold / scale, atol=1e-9)
    for i in range(0, len(Y), 10):
        s = G @ warm[i]
        assert s.min() > -1e-12 * np.abs(s).max()
        grad = X.T @ (X @ warm[i] - Y[i])
        active = np.flatnonzero(np.abs(s) < 1e-9 * np.abs(s).max())
        _, resid = nnls(G[active].T, grad)
        assert resid < 1e-9 * np.linalg.norm(grad), i


def test_a_warm_start_that_cycles_is_solved_from_scratch():
    """Two neighbouring brain voxels of the HCP-sized phantom (tests/data, with the gradient table
    and the tissue responses of that fit): warm-started from the first voxel's active set, the
    second hit the iteration limit on the machine where it was found (rounding made a degenerate
    path cycle; 1 voxel in 804,477), so its FOD was lost.  It must be solved, to the minimum the
    cold solve finds (the kernel falls back to a cold start; on another CPU's rounding the warm
    path may not cycle at all)."""
    from pathlib import Path

    from dipy.core.gradients import gradient_table
    from dipy.data import default_sphere
    from dipy.reconst.mcsd import MultiShellDeconvModel, multi_shell_fiber_response
    d = np.load(Path(__file__).parent / "data" / "msmt_warm_start_cycles.npz")
    response = multi_shell_fiber_response(8, bvals=np.array([0, 1000, 2000, 3000.0]), wm_rf=d["wm"],
                                          gm_rf=d["gm"], csf_rf=d["csf"])
    bvals = np.where(d["bvals"] <= 50, 0.0, np.round(d["bvals"] / 100) * 100)
    model = MultiShellDeconvModel(gradient_table(bvals, bvecs=d["bvecs"], b0_threshold=50), response,
                                  sh_order_max=8, reg_sphere=default_sphere)
    X, G = model._X, model.fitter._reg
    solver = ConstrainedLeastSquares(X, G.T)
    x, status, steps = solver.solve(d["signal"], steps=True)
    assert (status == OK).all(), steps
    cold, _, cold_steps = solver.solve(d["signal"][1:], steps=True, warm=False)
    assert cold_steps[0] < solver.max_iter
    np.testing.assert_allclose(x[1] / np.abs(cold[0]).max(), cold[0] / np.abs(cold[0]).max(), atol=1e-9)


def test_single_shell_model_on_multishell_data_says_what_it_left_out(multishell):
    """CSA uses one shell of multi-shell data: a downgrade naming the shells left out."""
    from bids_app.inputs import DwiData
    from bids_app.models import fit_odf
    sub, bvals, bvecs, aff = multishell
    mask = np.zeros(sub.brain_mask.shape, bool)
    mask[14:26, 18:30, 12:20] = True
    mask &= sub.brain_mask
    dwi = DwiData(signal=sub.dwi[mask], mask=mask, mean_b0=sub.dwi[..., 0], affine=aff, header=None,
                  bvals=bvals, bvecs=bvecs, zooms=(2.5, 2.5, 2.5))
    csa = fit_odf(dwi, mask, "csa", None)
    assert any("b=2000, b=3000" in d for d in csa.downgrades), csa.downgrades
    assert csa.bvalues == [1000.0]
