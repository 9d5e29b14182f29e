"""Tract profiles: orientation, trilinear sampling, inverse-Mahalanobis weights."""
import numpy as np
import pytest

from bids_app.group.bundles import fibres, profiles


def _oblique_grid():
    """A LAS, slightly rotated 2 mm grid around the origin."""
    th = np.radians(8)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-2.0, 2.0, 2.0])
    shape = (40, 40, 30)
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, aff


def _linear_map(shape, aff, coef, const):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    return (xyz @ np.asarray(coef) + const).reshape(shape)


def _bundle(rng, n=30):
    """Straight fibres from x=-20 to x=+20 (half stored backwards), random lateral offsets."""
    t = np.linspace(-20, 20, 41)
    out = []
    for k in range(n):
        off = rng.normal(scale=1.5, size=2)
        f = np.stack([t, np.full_like(t, off[0]), np.full_like(t, 3 + off[1])], 1)
        out.append(f[::-1] if k % 2 else f)
    return out


def test_profile_follows_a_linear_map_with_consistent_orientation():
    rng = np.random.default_rng(0)
    shape, aff = _oblique_grid()
    data = _linear_map(shape, aff, [0.005, 0.0, 0.0], 0.3)           # FA rises along +x
    sl = _bundle(rng)
    ref = fibres.resample(sl[:1], 20)[0]                              # runs -x -> +x
    flips = fibres.orient_to(fibres.resample(sl, 20), ref)
    assert flips.sum() == len(sl) // 2
    prof = profiles.bundle_profiles(sl, flips, {"fa": (data, aff)}, n_nodes=100)["fa"]
    expected = 0.3 + 0.005 * np.linspace(-20, 20, 100)
    np.testing.assert_allclose(prof, expected, atol=1e-6)
    # without orientation the two halves cancel out: a flat profile, not the ramp
    flat = profiles.bundle_profiles(sl, None, {"fa": (data, aff)}, n_nodes=100)["fa"]
    assert np.ptp(flat) < 0.05 * np.ptp(expected)


def test_mahalanobis_weights():
    rng = np.random.default_rng(1)
    nodes = profiles.oriented_nodes(_bundle(rng, 40), None, 50)
    nodes[::2] = nodes[::2, ::-1]                                    # undo the alternation
    nodes = nodes.copy()
    nodes[0] += [0, 8.0, 0]                                          # one stray streamline
    w = profiles.mahalanobis_weights(nodes)
    np.testing.assert_allclose(w.sum(0), 1.0)
    assert np.all(w[0] < np.median(w[1:], axis=0))
    few = profiles.mahalanobis_weights(nodes[:10])
    np.testing.assert_allclose(few, 0.1)                             # uniform below 15 streamlines


def test_weighted_profile_discounts_the_stray_streamline():
    rng = np.random.default_rng(2)
    shape, aff = _oblique_grid()
    data = _linear_map(shape, aff, [0.0, 0.02, 0.0], 0.5)    # varies across the bundle only (y),
    sl = _bundle(rng, 30)                                     # so orientation does not matter here
    stray = sl[0] + [0, 10.0, 0]
    prof_w = profiles.bundle_profiles(sl + [stray], None, {"v": (data, aff)}, 20)["v"]
    nodes = profiles.oriented_nodes(sl + [stray], None, 20)
    plain = profiles.profile(nodes, np.full((len(nodes), 20), 1 / len(nodes)), data, aff)
    core = profiles.bundle_profiles(sl, None, {"v": (data, aff)}, 20)["v"]
    assert np.all(np.abs(prof_w - core) < np.abs(plain - core))


def test_nodes_outside_the_image_are_ignored():
    shape, aff = _oblique_grid()
    data = np.ones(shape)
    f = np.stack([np.linspace(-20, 100, 50), np.zeros(50), np.zeros(50)], 1)   # leaves the grid
    prof = profiles.bundle_profiles([f, f + [0, 1, 0]], None, {"v": (data, aff)}, 30)["v"]
    assert np.isnan(prof[-1]) and np.all(prof[:5] == pytest.approx(1.0))
