"""TFCE kernel (kernels/tfce.py) against a plain numpy/scipy implementation."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from kernels.tfce import max_tfce_batch, neighbour_graph, tfce, tfce_graph


def tfce_reference(stat, mask, H=2.0, E=1.0, dh=None, connectivity=26):
    """Label the supra-threshold set at every h = k*dh with scipy and add e^E h^H dh."""
    s = np.where(mask, stat, 0.0).astype(np.float64)
    vmax = s.max()
    if vmax <= 0:
        return np.zeros_like(s)
    dh = vmax / 100 if dh is None else dh
    structure = ndi.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    out = np.zeros_like(s)
    k = 1
    while k * dh <= vmax:
        h = k * dh
        lab, _ = ndi.label(s >= h, structure=structure)
        sizes = np.bincount(lab.ravel())
        inside = lab > 0
        out[inside] += sizes[lab[inside]] ** E * h ** H * dh
        k += 1
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("connectivity", [6, 26])
def test_tfce_matches_scipy_reference(seed, connectivity):
    rng = np.random.default_rng(seed)
    stat = ndi.gaussian_filter(rng.standard_normal((14, 12, 10)), 1.3) * 6
    mask = (rng.random(stat.shape) > 0.25) & (stat > 0)
    ours = tfce(stat, mask, connectivity=connectivity)
    ref = tfce_reference(stat, mask, connectivity=connectivity)
    assert ref.max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-9)


def test_tfce_parameters_and_fixed_dh():
    rng = np.random.default_rng(7)
    stat = ndi.gaussian_filter(rng.standard_normal((10, 10, 10)), 1.0) * 4
    mask = stat > 0
    for H, E, dh in ((2.0, 1.0, 0.05), (1.0, 0.5, None), (3.0, 2.0, 0.2)):
        np.testing.assert_allclose(tfce(stat, mask, H=H, E=E, dh=dh), tfce_reference(stat, mask, H, E, dh),
                                   rtol=1e-10, atol=1e-9)


def test_tfce_known_values_two_blobs():
    """Two separated flat blobs: TFCE = size * sum_k (k dh)^2 dh, larger blob enhanced more."""
    stat = np.zeros((12, 6, 6))
    stat[1:3, 1:3, 1:3] = 2.0     # 8 voxels
    stat[6:10, 1:3, 1:3] = 2.0    # 16 voxels
    out = tfce(stat)
    dh = 2.0 / 100
    per_voxel = sum((k * dh) ** 2 * dh for k in range(1, 101))
    assert out[1, 1, 1] == pytest.approx(8 * per_voxel)
    assert out[7, 1, 1] == pytest.approx(16 * per_voxel)
    assert out[0, 0, 0] == 0
    # a negative map has no positive TFCE
    assert not tfce(-stat, stat != 0).any()


def test_batch_max_equals_per_map():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 9, 9)) > 0.4
    vox, indptr, indices = neighbour_graph(mask)
    stats = rng.standard_normal((6, len(vox)))
    stats[2] = -1.0  # nothing positive -> 0
    expected = [tfce_graph(r, indptr, indices, 0.0).max() for r in stats]
    np.testing.assert_allclose(max_tfce_batch(stats, indptr, indices, 2.0, 1.0), expected, rtol=1e-12)
    assert max_tfce_batch(stats, indptr, indices, 2.0, 1.0)[2] == 0.0


def test_neighbour_graph_is_symmetric_26():
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    vox, indptr, indices = neighbour_graph(mask, 26)
    assert len(vox) == 8
    assert np.all(np.diff(indptr) == 7)  # every voxel of a 2x2x2 cube touches the other 7
    edges = {(i, j) for i in range(len(vox)) for j in indices[indptr[i]:indptr[i + 1]]}
    assert all((j, i) in edges for i, j in edges)
