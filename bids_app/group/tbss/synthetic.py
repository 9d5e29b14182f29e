"""Small synthetic FA cohorts with known ground truth (tests and benchmarks).

A template-space phantom holds a few tube-shaped bundles (FA high on the core,
Gaussian fall-off) inside an ellipsoidal "brain" of low FA.  Each subject is the
phantom seen through a known smooth deformation: the subject's FA at native
world point ``y`` is the phantom's FA at ``phi(y) = A @ y + u(A @ y)`` (``A`` a
small random affine, ``u`` a smooth random displacement), so ``phi`` is the
true native -> template point map.  Patients have FA reduced in bundle
``ARC_L``.  Nothing here is used by the pipeline itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

BUNDLES = ("ARC_L", "ARC_R", "CC", "CST_L")
BACKGROUND_FA = 0.12
PEAK_FA = 0.62


def grid_affine(shape, voxel_size: float) -> np.ndarray:
    """RAS affine with isotropic voxels, world origin at the grid centre."""
    aff = np.diag([voxel_size] * 3 + [1.0])
    aff[:3, 3] = -voxel_size * (np.asarray(shape, float) - 1) / 2
    return aff


def world_coords(shape, affine) -> np.ndarray:
    """(X, Y, Z, 3) world mm of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _bundle_curves(extent: np.ndarray) -> dict[str, np.ndarray]:
    """Centre lines (n, 3) in world mm, scaled to the half-extent of the brain."""
    ex, ey, ez = extent
    t = np.linspace(0, 1, 200)
    th = np.pi * (0.15 + 0.7 * t)
    arc = np.stack([np.full_like(t, -0.5 * ex), 0.62 * ey * np.cos(th), 0.55 * ez * np.sin(th) - 0.15 * ez], 1)
    arc_r = arc * [-1, 1, 1]
    cc = np.stack([(-0.7 + 1.4 * t) * ex, np.full_like(t, -0.1 * ey),
                   0.55 * ez - 0.18 * ez * ((2 * t - 1) ** 2)], 1)
    cst = np.stack([np.full_like(t, 0.18 * ex), 0.25 * ey + 0 * t, (-0.75 + 1.1 * t) * ez], 1)
    return {"ARC_L": arc, "ARC_R": arc_r, "CC": cc, "CST_L": cst}


def _distance_to_curve(points: np.ndarray, curve: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree
    # dense resampling makes nearest-vertex distance a good curve distance
    seg = np.linspace(0, 1, 8)[:-1]
    dense = (curve[:-1, None, :] + (curve[1:] - curve[:-1])[:, None, :] * seg[None, :, None]).reshape(-1, 3)
    dense = np.vstack([dense, curve[-1:]])
    d, _ = cKDTree(dense).query(points.reshape(-1, 3))
    return d.reshape(points.shape[:-1])


@dataclass
class Phantom:
    """Template-space phantom: FA as a function of world position."""

    shape: tuple = (32, 36, 28)
    voxel_size: float = 3.0
    radius_mm: float = 4.5
    affine: np.ndarray = field(init=False)

    def __post_init__(self):
        self.affine = grid_affine(self.shape, self.voxel_size)
        self.extent = 0.42 * np.asarray(self.shape, float) * self.voxel_size
        self.curves = _bundle_curves(self.extent)

    def weights(self, points: np.ndarray) -> dict[str, np.ndarray]:
        """Per-bundle weight in [0, 1] (1 on the centre line) at world points (..., 3)."""
        sigma = self.radius_mm / 2.0
        return {n: np.exp(-_distance_to_curve(points, c) ** 2 / (2 * sigma ** 2))
                for n, c in self.curves.items()}

    def brain(self, points: np.ndarray) -> np.ndarray:
        r = np.sqrt((((points / self.extent)) ** 2).sum(-1))
        return np.clip((1.0 - r) / 0.08, 0, 1)  # soft edge about one voxel wide

    def fa(self, points: np.ndarray, *, effect: float = 0.0, affected: str = "ARC_L") -> np.ndarray:
        w = self.weights(points)
        core = np.zeros(points.shape[:-1])
        for name, wn in w.items():
            scale = (1.0 - effect) if name == affected else 1.0
            core = np.maximum(core, scale * wn)
        return self.brain(points) * (BACKGROUND_FA + (PEAK_FA - BACKGROUND_FA) * core)

    def template_fa(self) -> np.ndarray:
        return self.fa(world_coords(self.shape, self.affine))

    def bundle_masks(self, level: float = 0.5) -> dict[str, np.ndarray]:
        pts = world_coords(self.shape, self.affine)
        return {n: (w >= level) & (self.brain(pts) > 0.5) for n, w in self.weights(pts).items()}


@dataclass
class SubjectDeformation:
    """True native -> template point map ``phi(y) = A y + u(A y)``; ``u`` on the template grid."""

    linear: np.ndarray           # 4x4
    disp: np.ndarray             # (X, Y, Z, 3) mm, on the phantom grid
    grid_affine: np.ndarray      # phantom grid

    def __call__(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, float)
        a = pts @ self.linear[:3, :3].T + self.linear[:3, 3]
        ijk = (a - self.grid_affine[:3, 3]) @ np.linalg.inv(self.grid_affine[:3, :3]).T
        u = np.stack([ndi.map_coordinates(self.disp[..., k], ijk.reshape(-1, 3).T, order=1, mode="nearest")
                      for k in range(3)], -1).reshape(a.shape)
        return a + u


def random_deformation(phantom: Phantom, rng: np.random.Generator, *, scale: float = 1.0) -> SubjectDeformation:
    ang = np.deg2rad(rng.uniform(-5, 5, 3)) * scale
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    lin = np.eye(4)
    lin[:3, :3] = rx @ ry @ rz @ np.diag(1 + scale * rng.uniform(-0.05, 0.05, 3))
    lin[:3, 3] = scale * rng.uniform(-3, 3, 3)
    sigma_vox = 10.0 / phantom.voxel_size
    disp = np.stack([ndi.gaussian_filter(rng.standard_normal(phantom.shape), sigma_vox, mode="constant")
                     for _ in range(3)], -1)
    disp *= scale * 2.5 / max(np.sqrt((disp ** 2).sum(-1)).max(), 1e-9)  # peak displacement 2.5 mm
    return SubjectDeformation(lin, disp.astype(np.float32), phantom.affine)


@dataclass
class SyntheticSubject:
    label: str
    group: str
    age: float
    fa: np.ndarray
    md: np.ndarray
    ad: np.ndarray
    rd: np.ndarray
    affine: np.ndarray
    deformation: SubjectDeformation


def make_cohort(n_patients: int = 5, n_controls: int = 5, *, phantom: Phantom | None = None,
                effect: float = 0.25, noise: float = 0.02, seed: int = 0,
                calm_subject: int | None = 0) -> tuple[Phantom, list[SyntheticSubject]]:
    """Controls then patients; ``calm_subject`` gets a 4x smaller deformation (a clear target)."""
    phantom = phantom or Phantom()
    rng = np.random.default_rng(seed)
    subjects = []
    n = n_patients + n_controls
    for i in range(n):
        patient = i >= n_controls
        defo = random_deformation(phantom, rng, scale=0.25 if i == calm_subject else 1.0)
        pts = world_coords(phantom.shape, phantom.affine)  # native grid == phantom grid layout
        tp = defo(pts)
        fa = phantom.fa(tp, effect=effect if patient else 0.0)
        brain = phantom.brain(tp) > 0
        fa = np.where(brain, np.clip(fa + noise * rng.standard_normal(fa.shape), 0.0, 1.0), 0.0)
        md = np.where(brain, 0.8e-3 * (1 + 0.05 * rng.standard_normal(fa.shape)), 0.0)
        ad = md * (1 + fa)
        rd = md * (1 - fa / 2)
        subjects.append(SyntheticSubject(
            label=f"{i + 1:02d}", group="patient" if patient else "control",
            age=float(np.round(rng.uniform(20, 60), 1)),
            fa=fa.astype(np.float32), md=md.astype(np.float32), ad=ad.astype(np.float32),
            rd=rd.astype(np.float32), affine=phantom.affine.copy(), deformation=defo))
    return phantom, subjects


def write_cohort(bids_dir: Path, output_dir: Path, subjects: list[SyntheticSubject]) -> None:
    """Lay a cohort out as the participant level would (maps + participants.tsv)."""
    import json

    import nibabel as nib
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic TBSS cohort", "BIDSVersion": "1.10.0"}))
    rows = ["participant_id\tgroup\tage"] + [f"sub-{s.label}\t{s.group}\t{s.age}" for s in subjects]
    (bids_dir / "participants.tsv").write_text("\n".join(rows) + "\n")
    for s in subjects:
        d = output_dir / f"sub-{s.label}" / "dwi"
        d.mkdir(parents=True, exist_ok=True)
        for p in ("fa", "md", "ad", "rd"):
            img = nib.Nifti1Image(getattr(s, p), s.affine)
            nib.save(img, d / f"sub-{s.label}_model-tensor_param-{p}_dwimap.nii.gz")


# ----------------------------------------------------------------------------------------------
# the demo phantom (bids_app.demo), fitted with DTI, laid out as the participant level does

def _demo_setup(zooms: float):
    from bids_app.demo import demo_grid, make_gradients
    shape, affine = demo_grid("small", zooms=(zooms,) * 3)
    bvals, bvecs = make_gradients()
    return tuple(int(s) for s in shape), affine, bvals, bvecs


def demo_subject(meta: dict, index: int):
    """Re-simulate subject ``index`` of a cohort written by :func:`demo_cohort` (ground truth)."""
    from bids_app.demo import simulate_subject
    shape, affine, bvals, bvecs = _demo_setup(meta["zooms"])
    s = meta["subjects"][index]
    return simulate_subject(shape=shape, affine=affine, bvals=bvals, bvecs_voxel=bvecs, seed=s["seed"],
                            patient=s["patient"], snr=meta["snr"], deformation=s["deformed"])


def demo_cohort(bids_dir: Path, output_dir: Path, *, n_controls: int = 5, n_patients: int = 5,
                zooms: float = 3.0, seed: int = 100, snr: float = 30.0,
                undeformed: int | None = None) -> dict:
    """Simulate demo subjects (``bids_app.demo.simulate_subject``), fit DTI with dipy, and write
    FA/MD/AD/RD per the participant-level contract plus ``participants.tsv`` (group, age).

    Controls first, then patients (FA reduced in ARC_L).  Subject ``undeformed`` (index) gets
    no warp: its native space is the template space.  Returns (and writes to
    ``bids_dir/sourcedata/tbss_cohort.json``) the cohort description for :func:`demo_subject`.
    """
    import json

    import nibabel as nib
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps(
        {"Name": "tractoscale demo cohort (TBSS tests)", "BIDSVersion": "1.10.0"}))
    shape, affine, bvals, bvecs = _demo_setup(zooms)
    model = TensorModel(gradient_table(bvals, bvecs=bvecs))
    rng = np.random.default_rng(seed)
    rows = ["participant_id\tgroup\tage"]
    meta = {"zooms": zooms, "snr": snr, "shape": list(shape), "affine": affine.tolist(), "subjects": []}
    for i in range(n_controls + n_patients):
        s = {"label": f"{i + 1:02d}", "seed": seed + i, "patient": i >= n_controls, "deformed": i != undeformed}
        sim = demo_subject({**meta, "subjects": [s]}, 0)
        fit = model.fit(sim.dwi, mask=sim.brain_mask)
        d = output_dir / f"sub-{s['label']}" / "dwi"
        d.mkdir(parents=True, exist_ok=True)
        for p, arr in (("fa", fit.fa), ("md", fit.md), ("ad", fit.ad), ("rd", fit.rd)):
            arr = np.nan_to_num(np.asarray(arr, np.float32)) * sim.brain_mask
            nib.save(nib.Nifti1Image(arr.astype(np.float32), affine),
                     d / f"sub-{s['label']}_model-tensor_param-{p}_dwimap.nii.gz")
        rows.append(f"sub-{s['label']}\t{'patient' if s['patient'] else 'control'}\t{rng.uniform(20, 60):.1f}")
        meta["subjects"].append(s)
    (bids_dir / "participants.tsv").write_text("\n".join(rows) + "\n")
    (bids_dir / "sourcedata").mkdir(exist_ok=True)
    (bids_dir / "sourcedata" / "tbss_cohort.json").write_text(json.dumps(meta, indent=1))
    return meta


def cached_demo_cohort(base: Path, name: str = "tbss_demo", **kw) -> tuple[Path, Path, dict]:
    """Build :func:`demo_cohort` once under ``base/name`` (reused while complete); returns
    ``(bids_dir, output_dir, meta)`` of a pristine copy that callers must not modify."""
    import json

    from filelock import FileLock
    root = Path(base) / name
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        marker = root / "bids" / "sourcedata" / "tbss_cohort.json"
        if not marker.exists():
            import shutil
            shutil.rmtree(root, ignore_errors=True)
            demo_cohort(root / "bids", root / "out", **kw)
        meta = json.loads(marker.read_text())
    return root / "bids", root / "out", meta
