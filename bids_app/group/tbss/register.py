"""FA registration with dipy.align, packaged as independent executor tasks.

A registration maps a *moving* image (a participant's FA) onto a *static* one (the target):
centre of mass, then translation, rigid and affine by mutual information, then SyN with
the cross-correlation metric.  Every task is a plain top-level function of picklable
arguments (paths and dicts) so it runs the same in a local process pool and on Dask
workers; each task writes its own result (atomically) before returning, so a rerun
after a crash redoes only what is missing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from ...derivatives import write_json
from ...stages import Stage
from ..transforms import DisplacementField, SubjectTransform, grid_points
from .preprocess import load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationSettings:
    """Iterations are listed coarsest level first (dipy's convention)."""

    downsample: int = 1                       # integer subsampling of both images first
    coarse_voxel_mm: float = 0.0              # if > 0: subsample to about this voxel size instead
    nbins: int = 32
    affine_stages: tuple = ("translation", "rigid", "affine")
    affine_iters: tuple = (200, 100, 20)
    affine_sigmas: tuple = (3.0, 1.0, 0.0)
    affine_factors: tuple = (4, 2, 1)
    syn_iters: tuple = (50, 25, 10)
    cc_radius: int = 4

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "RegistrationSettings":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


FULL = RegistrationSettings()
# coarse: about 4 mm voxels (2 mm data subsampled by 2, 1 mm by 4; 3 mm data kept) and a
# two-level pyramid with fewer iterations
COARSE = RegistrationSettings(coarse_voxel_mm=4.0, affine_stages=("rigid", "affine"), affine_iters=(100, 20),
                              affine_sigmas=(1.0, 0.0), affine_factors=(2, 1), syn_iters=(30, 10), cc_radius=2)
QUICK_FULL = RegistrationSettings(affine_iters=(50, 20, 5), syn_iters=(20, 10, 5), cc_radius=2)
QUICK_COARSE = replace(COARSE, affine_iters=(30, 10), syn_iters=(10, 5))


def settings(stage: str, quick: bool = False) -> RegistrationSettings:
    """``stage``: 'full' or 'coarse'."""
    if stage == "coarse":
        return QUICK_COARSE if quick else COARSE
    return QUICK_FULL if quick else FULL


def subsampling_factor(affine: np.ndarray, st: RegistrationSettings) -> int:
    if st.coarse_voxel_mm <= 0:
        return max(1, int(st.downsample))
    voxel = float(np.mean(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))))
    return max(1, int(st.coarse_voxel_mm / voxel + 0.25))


def downsample(data: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian pre-smoothing then every ``factor``-th voxel (exact affine)."""
    if factor <= 1:
        return data, affine
    small = ndi.gaussian_filter(data, sigma=0.5 * factor, mode="constant")[::factor, ::factor, ::factor]
    aff = np.asarray(affine, float) @ np.diag([factor, factor, factor, 1.0])
    return np.ascontiguousarray(small, dtype=np.float32), aff


def _quiet_dipy():
    for name in ("dipy", "dipy.align", "dipy.align.imwarp", "dipy.align.imaffine"):
        logging.getLogger(name).setLevel(logging.WARNING)


def register_arrays(static, static_affine, moving, moving_affine, st: RegistrationSettings):
    """Affine (MI) then SyN (CC) of ``moving`` onto ``static``.

    Returns ``(affine, mapping)``: ``affine`` maps static world points to moving world
    points; ``mapping`` is dipy's DiffeomorphicMap whose ``transform_points`` maps static
    world points to moving world points (affine included).
    """
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D, TranslationTransform3D

    _quiet_dipy()
    static = np.ascontiguousarray(static, np.float32)
    moving = np.ascontiguousarray(moving, np.float32)
    com = transform_centers_of_mass(static, static_affine, moving, moving_affine)
    areg = AffineRegistration(metric=MutualInformationMetric(nbins=st.nbins, sampling_proportion=None),
                              level_iters=list(st.affine_iters), sigmas=list(st.affine_sigmas),
                              factors=list(st.affine_factors), verbosity=0)
    current = com.affine
    kinds = {"translation": TranslationTransform3D, "rigid": RigidTransform3D, "affine": AffineTransform3D}
    for transform in (kinds[k]() for k in st.affine_stages):
        amap = areg.optimize(static, moving, transform, None, static_grid2world=static_affine,
                             moving_grid2world=moving_affine, starting_affine=current)
        current = amap.affine

    st = fit_levels(st, static.shape)
    syn = SymmetricDiffeomorphicRegistration(CCMetric(3, sigma_diff=2.0, radius=_cc_radius(static.shape, st)),
                                             level_iters=list(st.syn_iters))
    syn.verbosity = 0
    mapping = syn.optimize(static, moving, static_grid2world=static_affine,
                           moving_grid2world=moving_affine, prealign=current)
    return current, mapping


MIN_COARSEST = 12  # voxels along the shortest axis at SyN's coarsest level


def fit_levels(st: RegistrationSettings, shape) -> RegistrationSettings:
    """Drop SyN's coarsest levels while they would be smaller than MIN_COARSEST voxels
    (on small images a tiny coarsest level makes SyN diverge)."""
    iters = tuple(st.syn_iters)
    while len(iters) > 1 and min(shape) / 2 ** (len(iters) - 1) < MIN_COARSEST:
        iters = iters[1:]
    return replace(st, syn_iters=iters) if iters != tuple(st.syn_iters) else st


def _cc_radius(shape, st: RegistrationSettings) -> int:
    """The CC window must fit in the coarsest SyN level."""
    smallest = min(shape) / 2 ** (len(st.syn_iters) - 1)
    return int(max(1, min(st.cc_radius, (smallest - 2) // 2)))


def deformation_score(mapping, static_shape, static_affine, mask) -> float:
    """Mean squared non-linear displacement (mm^2) over ``mask`` of the static grid.

    The registration's point map ``T`` (static -> moving, affine and SyN together) minus its
    least-squares affine approximation over the mask: what no affine can explain.  (SyN also
    absorbs part of any affine residual, so subtracting the affine stage's own matrix would
    count that as deformation.)
    """
    pts = grid_points(static_shape, static_affine)[mask]
    full = mapping.transform_points(pts)
    design = np.c_[pts, np.ones(len(pts))]
    coef, *_ = np.linalg.lstsq(design, full, rcond=None)
    return float(np.mean(np.sum((full - design @ coef) ** 2, axis=1)))


# ----------------------------------------------------------------------------------------------
# tasks (run on the executor)

def pair_scores_task(first: dict, second: dict, settings_dict: dict, out_json: str, meta: dict, *,
                     stage: Stage) -> dict:
    """Deformation scores of both directions of a pair, saved as JSON (the outputs of ``stage``).

    The affine is estimated once (``second`` onto ``first``) and its inverse starts the
    other direction; SyN runs both ways.  ``ScoreSecondToFirst`` is the score with
    ``first`` as the static image.
    """
    with stage.running():
        return _pair_scores(first, second, settings_dict, out_json, meta)


def _pair_scores(first: dict, second: dict, settings_dict: dict, out_json: str, meta: dict) -> dict:
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    t0, c0 = time.perf_counter(), time.process_time()
    st = RegistrationSettings.from_dict(settings_dict)
    a, a_aff = load_image(first)
    b, b_aff = load_image(second)
    factor = subsampling_factor(a_aff, st)
    a, a_aff = downsample(a, a_aff, factor)
    b, b_aff = downsample(b, b_aff, factor)
    affine, mapping = register_arrays(a, a_aff, b, b_aff, st)
    s_ba = deformation_score(mapping, a.shape, a_aff, a > 0)
    inv = np.linalg.inv(affine)
    st = fit_levels(st, b.shape)
    syn = SymmetricDiffeomorphicRegistration(CCMetric(3, sigma_diff=2.0, radius=_cc_radius(b.shape, st)),
                                             level_iters=list(st.syn_iters))
    syn.verbosity = 0
    back = syn.optimize(b, a, static_grid2world=b_aff, moving_grid2world=a_aff, prealign=inv)
    s_ab = deformation_score(back, b.shape, b_aff, b > 0)
    result = {"ScoreSecondToFirst": s_ba, "ScoreFirstToSecond": s_ab, "ScoreUnits": "mm^2",
              "Seconds": round(time.perf_counter() - t0, 3), "CPUSeconds": round(time.process_time() - c0, 3),
              "Subsampling": factor, "Inputs": meta}
    write_json(out_json, result)
    return result


def registration_task(moving: dict, target: dict, settings_dict: dict, *, output_dir: str,
                      entities: dict, space: str, chain: dict | None, meta: dict, stage: Stage) -> dict:
    """Register a participant's FA to the target and save the native <-> common transform (the
    outputs of ``stage``).

    ``chain`` (optional) holds the target -> template transform (``to_native``/``to_common``
    displacement-field paths); the saved transform is then native <-> template.
    """
    with stage.running():
        return _register(moving, target, settings_dict, output_dir=output_dir, entities=entities,
                         space=space, chain=chain, meta=meta)


def _register(moving: dict, target: dict, settings_dict: dict, *, output_dir: str, entities: dict,
              space: str, chain: dict | None, meta: dict) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    st = RegistrationSettings.from_dict(settings_dict)
    s, s_aff = load_image(target)
    m, m_aff = load_image(moving)
    affine, mapping = register_arrays(s, s_aff, m, m_aff, st)
    xfm = transform_from_mapping(mapping, s.shape, s_aff, m.shape, m_aff, entities, space)
    if chain is not None:
        xfm = chain_transform(xfm, DisplacementField.load(chain["to_native"]),
                              DisplacementField.load(chain["to_common"]))
    seconds = round(time.perf_counter() - t0, 3)
    cpu = round(time.process_time() - c0, 3)
    xfm.save(output_dir, {"Inputs": meta, "Seconds": seconds, "CPUSeconds": cpu})
    return {"entities": entities, "Seconds": seconds, "CPUSeconds": cpu}


def transform_from_mapping(mapping, static_shape, static_affine, moving_shape, moving_affine,
                           entities: dict, space: str) -> SubjectTransform:
    """Tabulate dipy's map as our pair of displacement fields (static = common space)."""
    to_native = DisplacementField.from_function(mapping.transform_points, static_shape, static_affine)
    to_common = DisplacementField.from_function(mapping.transform_points_inverse, moving_shape, moving_affine)
    return SubjectTransform(dict(entities), space, to_native, to_common)


def chain_transform(xfm: SubjectTransform, tpl_to_target: DisplacementField,
                    target_to_tpl: DisplacementField) -> SubjectTransform:
    """native <-> target composed with target <-> template.

    ``tpl_to_target`` lives on the template grid (template point -> target point);
    ``target_to_tpl`` lives on the target grid (target point -> template point).
    """
    to_native = tpl_to_target.then(xfm.to_native)
    to_common = xfm.to_common.then(target_to_tpl)
    return SubjectTransform(xfm.entities, xfm.space, to_native, to_common)


def template_alignment_task(target: dict, template: dict, settings_dict: dict, *, out_to_target: str,
                            out_to_template: str, meta: dict, stage: Stage) -> dict:
    """Register the target FA to a template image and save both displacement fields (the outputs
    of ``stage``)."""
    with stage.running():
        return _align_to_template(target, template, settings_dict, out_to_target, out_to_template, meta)


def _align_to_template(target: dict, template: dict, settings_dict: dict, out_to_target: str,
                       out_to_template: str, meta: dict) -> dict:
    t0 = time.perf_counter()
    st = RegistrationSettings.from_dict(settings_dict)
    s, s_aff = load_image(template)
    m, m_aff = load_image(target)
    affine, mapping = register_arrays(s, s_aff, m, m_aff, st)
    to_target = DisplacementField.from_function(mapping.transform_points, s.shape, s_aff)
    to_template = DisplacementField.from_function(mapping.transform_points_inverse, m.shape, m_aff)
    seconds = round(time.perf_counter() - t0, 3)
    side = {"Inputs": meta, "Seconds": seconds, "Units": "mm", "CoordinateSystem": "RAS+ world"}
    to_target.save(out_to_target, {**side, "Description": "On the template grid: template point p maps "
                                   "to target point p + d(p)."})
    to_template.save(out_to_template, {**side, "Description": "On the target grid: target point p maps "
                                       "to template point p + d(p)."})
    return {"Seconds": seconds}


def identity_task(target: dict, *, output_dir: str, entities: dict, space: str, chain: dict | None,
                  meta: dict, stage: Stage) -> dict:
    """The participant that is the target: identity (or just the target -> template chain)."""
    with stage.running():
        return _identity(target, output_dir=output_dir, entities=entities, space=space, chain=chain, meta=meta)


def _identity(target: dict, *, output_dir: str, entities: dict, space: str, chain: dict | None,
              meta: dict) -> dict:
    import nibabel as nib
    img = nib.load(str(target["path"]))
    ident = DisplacementField.identity(img.shape[:3], img.affine)
    xfm = SubjectTransform(dict(entities), space, ident, ident)
    if chain is not None:
        xfm = chain_transform(xfm, DisplacementField.load(chain["to_native"]),
                              DisplacementField.load(chain["to_common"]))
    xfm.save(output_dir, {"Inputs": meta, "Seconds": 0.0})
    return {"entities": entities, "Seconds": 0.0}
