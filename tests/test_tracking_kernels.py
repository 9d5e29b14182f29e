"""Tracking kernels on analytic fields: geometry, DIPY agreement, CPU == CUDA simulator, RNG."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kernels.engine import MaskSeeder, PointSeeder, TrackParams, Tracker, bootstrap_arrays, prepare, track_all
from kernels.frames import sh_order_from_ncoef

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- analytic fields
def _fibre_sh(dirs, k=30.0, order=8):
    """tournier07 (legacy=False) SH of a sharp single-fibre ODF along each direction."""
    from dipy.data import get_sphere
    from dipy.reconst.shm import sh_to_sf_matrix
    sph = get_sphere(name="repulsion724")
    _, inv = sh_to_sf_matrix(sph, sh_order_max=order, basis_type="tournier07", legacy=False)
    d = dirs.reshape(-1, 3)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    sf = np.exp(-k * (1 - (d @ sph.vertices.T) ** 2))
    return (sf @ inv).reshape(dirs.shape[:3] + (-1,)).astype(np.float32)


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)


def _oblique_affine(vs, flip=True, angles=(20, -10, 35), shift=(10.0, -20.0, 5.0)):
    from scipy.spatial.transform import Rotation
    aff = np.eye(4)
    m = np.diag(vs).astype(float)
    if flip:
        m = np.diag([-1.0, 1, 1]) @ m
    aff[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ m
    aff[:3, 3] = shift
    return aff


def _to_vox(points, aff):
    inv = np.linalg.inv(aff)
    return points @ inv[:3, :3].T + inv[:3, 3]


HELIX_SHAPE = (30, 30, 20)
HELIX_C = np.array([14.5, 14.5])
HELIX_K = 0.15


def _helix_field():
    """Direction field whose integral curves are helices around the z voxel axis."""
    ijk = _grid(HELIX_SHAPE)
    x, y = ijk[..., 0] - HELIX_C[0], ijk[..., 1] - HELIX_C[1]
    return np.stack([-y, x, HELIX_K * np.hypot(x, y)], -1)


@pytest.fixture(scope="module")
def helix_sh():
    return _fibre_sh(_helix_field())


def _track(sh, aff, seeds_vox, odf_mode="sf", **kw):
    p = TrackParams(**{"algorithm": "det", "step_size": 0.2, "min_length": 0, "max_length": 60,
                       **kw})
    data = prepare(sh=sh, affine=aff, params=p, stop_map=np.ones(sh.shape[:3], np.float32),
                   odf_mode=odf_mode)
    return track_all(Tracker(data, "cpu"), PointSeeder(seeds_vox))


# ----------------------------------------------------------------------------- geometry
def test_straight_field_oblique_anisotropic_world_line():
    """A straight fibre along a voxel-frame direction: points on the true world line, steps in mm."""
    shape = (24, 20, 14)
    vs = (1.0, 1.5, 2.5)
    aff = _oblique_affine(vs)
    d_vox = np.array([1.0, 0.6, 0.3])
    d_vox /= np.linalg.norm(d_vox)
    sh = _fibre_sh(np.broadcast_to(d_vox, shape + (3,)).copy())
    seed_vox = np.array([[11.0, 9.0, 6.0]])
    (s,), _ = _track(sh, aff, seed_vox, step_size=0.5, max_length=500)
    # true line in world: through the seed along the voxel-frame direction mapped to world
    frame = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    d_world = frame @ d_vox
    p0 = aff[:3, :3] @ seed_vox[0] + aff[:3, 3]
    assert np.linalg.norm(s - p0, axis=1).min() < 1e-4  # the seed is a point of the streamline
    centred = s - s.mean(axis=0)
    axis = np.linalg.svd(centred)[2][0]
    assert np.linalg.norm(centred - np.outer(centred @ axis, axis), axis=1).max() < 0.05  # straight
    # along the true world direction, up to the sphere's angular resolution (~5 deg)
    assert np.degrees(np.arccos(abs(axis @ d_world))) < 4.0
    steps = np.linalg.norm(np.diff(s, axis=0), axis=1)
    np.testing.assert_allclose(steps, 0.5, rtol=1e-4)  # step size in mm despite anisotropy
    # both ends at the image border (tracking runs until it leaves the image)
    ends = _to_vox(s[[0, -1]], aff)
    lim = np.array(shape) - 1
    assert all(np.any((e < 0.5) | (e > lim - 0.5)) for e in ends)


def test_helix_follows_true_curve(helix_sh):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    seeds = np.array([[HELIX_C[0] + 8, HELIX_C[1], 6.0], [HELIX_C[0], HELIX_C[1] + 5, 6.0]])
    sls, _ = _track(helix_sh, aff, seeds)
    assert len(sls) == 2
    for s, sd in zip(sls, seeds):
        assert len(s) == 301  # 60 mm / 0.2 mm + 1: ran to the maximum length
        r0 = np.hypot(*(sd[:2] - HELIX_C))
        r = np.hypot(s[:, 0] - HELIX_C[0], s[:, 1] - HELIX_C[1])
        assert np.abs(r - r0).max() < 1.0
        th = np.unwrap(np.arctan2(s[:, 1] - HELIX_C[1], s[:, 0] - HELIX_C[0]))
        th0 = np.arctan2(sd[1] - HELIX_C[1], sd[0] - HELIX_C[0])
        z_true = sd[2] + HELIX_K * r0 * (th - th0)
        # directions are sphere vertices (~5 deg apart): the pitch error accumulates slowly
        assert np.abs(s[:, 2] - z_true).max() < 0.15 * 60
        assert abs(th[-1] - th[0]) > 0.8 * 60 / np.hypot(r0, HELIX_K * r0)  # went around


def test_crossing_goes_straight_through():
    shape = (30, 30, 8)
    ijk = _grid(shape)
    dirs = np.zeros(shape + (3,))
    dirs[..., 0] = 1.0
    sh = _fibre_sh(dirs)
    cross = (np.abs(ijk[..., 0] - 14.5) < 5)
    sh2 = _fibre_sh(np.broadcast_to([0.0, 1.0, 0.0], shape + (3,)).copy())
    single, _ = _track(sh.copy(), np.eye(4), np.array([[3.0, 10.0, 4.0], [3.0, 20.0, 4.0]]),
                       max_length=100)
    sh[cross] += sh2[cross]  # two fibre populations at 90 degrees in the middle band
    seeds = np.array([[3.0, 10.0, 4.0], [3.0, 20.0, 4.0]])
    sls, _ = _track(sh, np.eye(4), seeds, max_length=100)
    for s, s1, sd in zip(sls, single, seeds):
        assert s[:, 0].min() < 0 and s[:, 0].max() > 28.5  # crossed the whole band
        assert np.abs(s[:, 1] - sd[1]).max() < 1.2  # did not turn (sphere quantisation ~2 deg)
        # the crossing does not bend the path: same as without the second population
        assert len(s) == len(s1)
        assert np.abs(s - s1).max() < 0.3


def test_matches_dipy_deterministic_oblique(helix_sh):
    """Same seeds and settings: our points coincide with DIPY's on an oblique LAS-like grid."""
    from dipy.data import default_sphere
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.tracker import deterministic_tracking
    aff = _oblique_affine((1.0, 1.5, 2.0))
    seeds = np.array([[22.5, 14.5, 6.0], [14.5, 19.5, 6.0], [20.0, 8.0, 9.0]])
    ours, _ = _track(helix_sh, aff, seeds, max_length=60)
    seeds_w = seeds @ aff[:3, :3].T + aff[:3, 3]
    fa = np.ones(HELIX_SHAPE)
    ref = list(deterministic_tracking(
        seeds_w, ThresholdStoppingCriterion(fa, 0.5), aff, sh=helix_sh.astype(np.float64),
        sphere=default_sphere, basis_type="tournier07", legacy=False, step_size=0.2, min_len=0,
        max_len=1000, max_angle=30, pmf_threshold=0.1, nbr_threads=1, random_seed=1))
    assert len(ref) == len(ours) == 3
    from scipy.spatial import cKDTree
    for a, b in zip(ours, ref):
        # DIPY limits each half to max_len, we limit the joined streamline: ours is a contiguous
        # run of DIPY's points
        assert 100 < len(a) <= len(b)
        dist, j = cKDTree(b).query(a)
        assert dist.max() < 1e-3
        assert np.all(np.abs(np.diff(j)) == 1) and len(np.unique(np.sign(np.diff(j)))) == 1


# ----------------------------------------------------------------------------- reproducibility
def _noisy_crossing(seed=0, shape=(12, 10, 8)):
    rng = np.random.default_rng(seed)
    sh = _fibre_sh(np.broadcast_to([1.0, 0.3, 0.0], shape + (3,)).copy(), order=6)
    sh[6:] += _fibre_sh(np.broadcast_to([0.0, 1.0, 0.2], shape + (3,)).copy(), order=6)[6:]
    sh += rng.normal(0, 0.02, sh.shape).astype(np.float32)
    fa = np.full(shape, 0.5, np.float32)
    fa[:, :, 0] = 0.05  # a stopping slab
    return sh, fa


def _crossing_dwi(shape=(12, 10, 8), n_dirs=30, seed=0):
    """Two-tensor DWI matching :func:`_noisy_crossing` (b=1000, 2 b=0), voxel-frame bvecs."""
    from dipy.core.gradients import gradient_table
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, 0.0, np.full(n_dirs, 1000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), g])

    def tensor_signal(d):
        d = np.asarray(d, float) / np.linalg.norm(d)
        proj = bvecs @ d
        return np.exp(-bvals * (0.3e-3 + 1.4e-3 * proj ** 2))

    s1 = tensor_signal([1.0, 0.3, 0.0])
    s2 = 0.5 * (s1 + tensor_signal([0.0, 1.0, 0.2]))
    dwi = np.empty(shape + (len(bvals),), np.float32)
    dwi[:] = 100 * s1
    dwi[6:] = 100 * s2
    dwi += rng.normal(0, 2.0, dwi.shape).astype(np.float32)
    return np.abs(dwi), gradient_table(bvals, bvecs=bvecs)


def _prob_setup(algo="prob", odf_mode="sf", rng_seed=3, sphere="repulsion724", n=40,
                max_length=20.0, stop="threshold"):
    """Tracking data and seeds on the noisy crossing; ``stop``: threshold on FA, or ACT/CMC with
    the image's x and y faces as include region and its z faces as exclude region."""
    sh, fa = _noisy_crossing()
    p = TrackParams(algorithm=algo, step_size=0.5, min_length=2, max_length=max_length,
                    max_cross=2, rng_seed=rng_seed, stop_method=stop)
    extra = {}
    if algo == "boot":
        dwi, gtab = _crossing_dwi()
        dw = ~gtab.b0s_mask
        extra = dict(bootstrap=bootstrap_arrays(dwi[..., dw], dwi[..., ~dw].mean(-1), gtab.bvecs[dw],
                                                sh_order_from_ncoef(sh.shape[-1]), "csa", smooth=0.006))
    if stop == "threshold":
        extra["stop_map"] = fa
    else:
        include = np.zeros(fa.shape, np.float32)
        include[[0, -1]] = 1.0
        include[:, [0, -1]] = 1.0
        exclude = np.zeros(fa.shape, np.float32)
        exclude[:, :, [0, -1]] = 1.0
        extra.update(include_map=include, exclude_map=exclude)
    data = prepare(sh=sh, affine=np.diag([2.0, 1.5, 2.0, 1.0]), params=p, odf_mode=odf_mode,
                   sphere=sphere, **extra)
    return data, MaskSeeder(fa > 0.2, n_seeds=n, rng_seed=5)


def _prob_run(chunk, device="cpu", precision=None, gpus=None, **setup):
    data, seeder = _prob_setup(**setup)
    return track_all(Tracker(data, device, precision=precision, gpus=gpus), seeder, chunk_size=chunk)


def _same(a, b):
    assert np.array_equal(a[1], b[1])
    assert len(a[0]) == len(b[0])
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("algo", ["prob", "ptt", "boot"])
def test_chunk_size_and_thread_count_do_not_change_streamlines(algo):
    import numba
    ref = _prob_run(chunk=40, algo=algo)
    assert len(ref[0]) > 20
    _same(ref, _prob_run(chunk=1, algo=algo))
    _same(ref, _prob_run(chunk=7, algo=algo))
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        _same(ref, _prob_run(chunk=13, algo=algo))
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("algo", ["prob", "ptt", "boot"])
def test_rng_seed_controls_random_streamlines(algo):
    a = _prob_run(chunk=40, rng_seed=3, algo=algo)
    b = _prob_run(chunk=40, rng_seed=4, algo=algo)
    _same(a, _prob_run(chunk=40, rng_seed=3, algo=algo))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a[0], b[0]))


def test_sf_and_sh_modes_agree():
    a = _prob_run(chunk=40, odf_mode="sf", algo="det")
    b = _prob_run(chunk=40, odf_mode="sh", algo="det")
    from scipy.spatial import cKDTree
    assert np.array_equal(a[1], b[1])
    # the sampled table holds the ODF to 3e-5 of each voxel's maximum (int16): a peak just at the
    # threshold can flip, so a streamline may gain or lose one point at an end; never more
    differ = 0
    for x, y in zip(a[0], b[0]):
        if len(x) == len(y) and np.abs(x - y).max() < 1e-3:
            continue
        differ += 1
        short, long_ = (x, y) if len(x) < len(y) else (y, x)
        assert len(long_) - len(short) <= 2
        assert cKDTree(long_).query(short)[0].max() < 1e-3
    assert differ <= 0.05 * len(a[0])


def test_odf_table_keeps_mask_voxels_in_int16():
    """The sampled ODF is stored for mask voxels only, as int16 with a scale per voxel: each
    value within 1/65534 of its voxel's largest magnitude; half the bytes of a float32 volume,
    times the mask's share of the image."""
    from kernels.sphere import hemisphere, sh_to_sf_matrix
    sh, fa = _noisy_crossing()
    mask = np.zeros(fa.shape, bool)
    mask[2:10, 1:9, 1:7] = True
    p = TrackParams()
    data = prepare(sh=sh, affine=np.eye(4), params=p, stop_map=fa, mask=mask, odf_mode="sf")
    assert data.odf_sf.dtype == np.int16 and data.odf_sf.shape[1] % 16 == 0
    assert np.array_equal(data.odf_index > 0, mask)
    assert np.array_equal(np.sort(data.odf_index[mask]), np.arange(1, mask.sum() + 1))
    verts, _ = hemisphere("repulsion724")
    truth = sh[mask] @ sh_to_sf_matrix(verts, 6).T
    rows = data.odf_index[mask]
    got = data.odf_sf[rows, :len(verts)] * data.odf_scale[rows, None].astype(np.float64)
    err = np.abs(got - truth).max(axis=1) / np.abs(truth).max(axis=1)
    assert err.max() <= 0.5 / 32767 + 1e-6
    assert np.all(data.odf_sf[0] == 0)          # row 0: voxels without an ODF
    dense = fa.size * len(verts) * 4
    rows = (mask.sum() + 1) * (data.odf_sf.shape[1] * 2 + 4)
    assert data.odf_nbytes == rows + fa.size * 4 + 4          # + the voxel -> row index (+ sh dummy)
    assert rows < 0.52 * dense * mask.mean()
    sh_data = prepare(sh=sh, affine=np.eye(4), params=p, stop_map=fa, mask=mask, odf_mode="sh")
    np.testing.assert_array_equal(sh_data.odf_sh[sh_data.odf_index[mask]], sh[mask])
    # the per-voxel maxima that the probabilistic threshold uses: zero outside the mask
    assert np.all(data.stop[~mask, -1] == 0) and np.all(data.stop[mask, -1] > 0)


def test_sphere_order_is_local():
    """Vertices along a Hilbert curve: a 30 degree cone's ~50 vertices occupy few 32-byte sectors
    of an int16 table row (DIPY's own order: ~15)."""
    from kernels.sphere import hemisphere
    verts, nbrs = hemisphere("repulsion724")
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(2000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cone = np.abs(dirs @ verts.T) >= np.cos(np.radians(30))
    sectors = [len(np.unique(np.flatnonzero(c) * 2 // 32)) for c in cone]
    assert 40 < cone.sum(1).mean() < 60 and np.mean(sectors) < 8
    # the neighbour table still joins neighbouring vertices (edges of the sphere's mesh)
    cos = np.abs((verts[:, None, :] * verts[np.maximum(nbrs, 0)]).sum(-1))[nbrs >= 0]
    assert cos.min() > np.cos(np.radians(15))


def test_lengths_respect_min_max_and_seeds_in_voxels():
    sls, idx = _prob_run(chunk=40, max_length=12.0)
    n = np.array([len(s) for s in sls])
    assert n.max() <= 12.0 / 0.5 + 1 and n.min() >= 2 / 0.5 + 1
    fa = _noisy_crossing()[1]
    vox = np.argwhere(fa > 0.2)
    seeds = MaskSeeder(fa > 0.2, per_voxel=3, rng_seed=1).chunk(0, 3 * len(vox))
    assert np.abs(seeds - np.repeat(vox, 3, axis=0)).max() <= 0.5


# ----------------------------------------------------------------------------- precision
def test_float32_arithmetic_agrees_with_float64():
    """The GPU builds' float32 arithmetic, run on the CPU, against the CPU's float64: the same
    streamlines to 1e-4 mm for every algorithm with discrete choices (same draws, rounded to 24
    bits); PTT's continuous curvature draws drift apart, with the same statistics."""
    for algo in ("det", "prob", "boot", "ptt"):
        a = _prob_run(chunk=400, precision="float64", algo=algo, n=300, max_length=20.0)
        b = _prob_run(chunk=400, precision="float32", algo=algo, n=300, max_length=20.0)
        assert len(a[0]) > 300, algo
        if algo == "ptt":
            assert abs(len(a[0]) - len(b[0])) <= 0.05 * len(a[0])
            la, lb = (np.mean([len(x) for x in r[0]]) for r in (a, b))
            assert abs(la - lb) <= 0.05 * la
            continue
        assert np.array_equal(a[1], b[1]), algo
        for x, y in zip(a[0], b[0]):
            assert len(x) == len(y) and np.abs(x - y).max() < 1e-4, algo


# ----------------------------------------------------------------------------- CUDA
# (algorithm, ODF mode, stopping rule, max length): the simulator runs the CUDA builds' code
# path (seed-peak kernel, persistent threads over half streamlines, joining, packing) in float32
PARITY = (("prob", "sf", "threshold", 8.0), ("prob", "sh", "threshold", 8.0),
          ("det", "sf", "threshold", 8.0), ("det", "sh", "threshold", 8.0),
          ("ptt", "sf", "threshold", 8.0), ("boot", "sf", "threshold", 8.0),
          ("prob", "sf", "act", 20.0), ("det", "sf", "cmc", 20.0))
_CUDA_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tests.test_tracking_kernels import _parity_runs
    print(json.dumps(_parity_runs(sys.argv[1])))
""")


def _parity_runs(device, gpus=None, configs=PARITY, precision="float32"):
    out = {}
    for algo, mode, stop, length in configs:
        sl, idx = _prob_run(chunk=16, algo=algo, odf_mode=mode, stop=stop, sphere="repulsion100", n=16,
                            max_length=length, device=device, precision=precision, gpus=gpus)
        out["-".join((algo, mode, stop))] = [idx.tolist(), [s.tolist() for s in sl]]
    return out


def _simulated(device, **kw):
    """Runs on ``device`` with the CUDA simulator active (in a subprocess if this one has none)."""
    from numba import config
    if config.ENABLE_CUDASIM:
        return _parity_runs(device, **kw)
    assert not kw
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "TRACTOSCALE_ALLOW_CUDASIM": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT.format(root=str(ROOT)), device],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _identical(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key][0] == b[key][0], key
        assert len(a[key][1]) == len(b[key][1]), key
        for x, y in zip(a[key][1], b[key][1]):
            assert x == y, key     # bit for bit


def test_cuda_simulator_gives_the_cpu_build_streamlines_bit_for_bit():
    """Same build constants on both targets: the CUDA path (peak kernel, persistent threads over
    half streamlines joined afterwards, ACT/CMC included) gives the CPU's tractogram exactly."""
    pytest.importorskip("numba.cuda")
    cpu = _simulated("cpu")
    cuda = _simulated("cuda")
    assert all(len(v[0]) > 5 for v in cpu.values()), {k: len(v[0]) for k, v in cpu.items()}
    _identical(cpu, cuda)


def test_cuda_float64_build_and_several_gpus_keep_the_tractogram():
    """The float64 CUDA build gives the CPU's default (float64) streamlines; chunks spread over
    two (simulated) GPUs come back in order as the same tractogram."""
    from numba import config
    if not config.ENABLE_CUDASIM:
        pytest.skip("needs the CUDA simulator in this process (the test suite's conftest sets it)")
    one = (("prob", "sf", "threshold", 8.0),)
    assert _parity_runs("cpu", configs=one, precision="float64") == \
        _parity_runs("cuda", configs=one, precision="float64")
    data, seeder = _prob_setup(sphere="repulsion100", n=40, max_length=8.0)
    tracker = Tracker(data, "cuda", gpus=[0, 0])
    multi = track_all(tracker, seeder, chunk_size=7)
    assert tracker._cuda.chunks_per_gpu == {0: 3, 1: 3}
    _same(track_all(Tracker(data, "cuda"), seeder, chunk_size=40), multi)
    _same(track_all(Tracker(data, "cpu", precision="float32"), seeder, chunk_size=40), multi)


def test_every_cuda_build_compiles_within_its_resources(tmp_path):
    """Not the simulator: NVVM compiles every specialised build to sm_90 PTX and ptxas assembles
    it.  The probabilistic / sampled-ODF / threshold kernel (the default) fits 128 registers and
    2 KB of stack; no kernel spills; float32 builds do their tracking arithmetic in float32."""
    pytest.importorskip("numba.cuda")
    pytest.importorskip("nvidia.cuda_nvcc", reason="no ptxas (pip install numba-cuda[cu12])")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    if "NVVM" in proc.stderr and "not" in proc.stderr and proc.returncode != 0:
        pytest.skip("no NVVM installed (pip install numba-cuda[cu12])")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["variant"], r["kernel"]): r for r in json.loads(out.read_text())}
    builds = {v for v, _ in rows}
    assert {f"{a}-{m}-threshold-float32" for a in ("prob", "det", "ptt", "boot") for m in ("sf", "sh")} \
        | {"prob-sf-act-float32", "prob-sf-cmc-float32", "prob-sf-threshold-float64"} <= builds
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows.values())
    default = rows["prob-sf-threshold-float32", "track_tasks_cuda"]
    assert default["registers"] <= 128 and default["stack"] <= 2048
    assert rows["prob-sf-threshold-float64", "track_tasks_cuda"]["registers"] > default["registers"]
    for (v, k), r in rows.items():
        assert r["registers"] <= 255 and r["stack"] <= 4096, (v, k)
        if v.endswith("float32") and v.split("-")[0] in ("prob", "det"):
            assert r["f64_ops"] == 0, (v, k)     # PTT/bootstrap: float64 sin/cos/log only


def test_select_device(monkeypatch):
    from kernels import device
    from kernels.errors import DeviceError, ParameterError
    assert device.select_device("cpu") == "cpu"
    with pytest.raises(ParameterError):
        device.select_device("tpu")
    monkeypatch.delenv("TRACTOSCALE_ALLOW_CUDASIM", raising=False)
    if device.real_gpu_available():
        pytest.skip("a real GPU is present")
    assert device.select_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="CUDA"):
        device.select_device("cuda")
    if device.cudasim_enabled():
        monkeypatch.setenv("TRACTOSCALE_ALLOW_CUDASIM", "1")
        assert device.select_device("cuda") == "cuda"
        assert device.select_device("auto") == "cuda"


def test_gpu_lists():
    from kernels.device import check_gpus, parse_gpus, real_gpu_available
    from kernels.errors import ParameterError
    assert parse_gpus(None) is None and parse_gpus("all") is None and parse_gpus(" ALL ") is None
    assert parse_gpus("0, 2") == [0, 2] and parse_gpus([1]) == [1]
    for bad in ("0,x", "1,1", "-1", ","):
        with pytest.raises(ParameterError, match="gpus"):
            parse_gpus(bad)
    if not real_gpu_available():
        assert check_gpus("3") == [3]      # numbers are checked against the GPUs when there are some
