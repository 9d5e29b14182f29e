"""Demo dataset: a white-matter phantom with ground truth, simulated as a BIDS raw dataset."""
from .phantom import BUNDLE_DESCRIPTIONS, BUNDLES, geometry, template_trajectories
from .simulate import SubjectSim, Warp, demo_grid, make_gradients, simulate_subject

__all__ = [
    "BUNDLES", "BUNDLE_DESCRIPTIONS", "SubjectSim", "Warp", "demo_grid", "geometry",
    "make_demo_dataset", "make_gradients", "simulate_subject", "template_trajectories",
]


def make_demo_dataset(*args, **kwargs):
    """Write the demo BIDS dataset (see :func:`bids_app.demo.dataset.make_demo_dataset`)."""
    from .dataset import make_demo_dataset as _make
    return _make(*args, **kwargs)
